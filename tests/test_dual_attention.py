"""Fused dual-stream attention kernel vs the two-SDPA reference (Triton interpreter on CPU, native on a GPU)."""
import pytest
import torch
from helpers import exact_fp32, unet_inputs, unet_with

from storymaker_serve.kernels.dual_attention import dual_attention, dual_attention_reference
from storymaker_serve.runtime.kernel_attention import KernelAttnProcessor, use_dual_attention_kernel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5


def qkv(b, h, m, d, n_img, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)
    return r(b, h, m, d), r(b, h, 77, d), r(b, h, 77, d), r(b, h, n_img, d), r(b, h, n_img, d)


@pytest.mark.parametrize("m", [1, 17, 64, 100])            # incl. lengths that are not block multiples
@pytest.mark.parametrize("chars", [1, 2, 3])               # 40, 60, 80 image tokens
@pytest.mark.parametrize("ip_scale", [0.0, 0.8])
def test_dual_attention_matches_reference_fp32(m, chars, ip_scale):
    t = qkv(2, 2, m, 64, 20 * (chars + 1), seed=m + chars)
    with exact_fp32():
        got, want = dual_attention(*t, ip_scale), dual_attention_reference(*t, ip_scale)
    assert got.shape == want.shape == (2, 2, m, 64)
    assert (got - want).abs().max().item() <= FP32_TOL


def test_dual_attention_per_sample_scale_and_strided_inputs():
    b, h, m, d = 3, 2, 45, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, m, h, d, generator=g).to(DEV).transpose(1, 2)     # (B, H, M, d) view, not contiguous
    k_t, v_t = (torch.randn(b, 77, h, d, generator=g).to(DEV).transpose(1, 2) for _ in range(2))
    k_i, v_i = (torch.randn(b, h, 60, d, generator=g).to(DEV) for _ in range(2))
    scale = torch.tensor([0.0, 0.5, 1.0], device=DEV)
    got = dual_attention(q, k_t, v_t, k_i, v_i, scale)
    assert (got - dual_attention_reference(q, k_t, v_t, k_i, v_i, scale)).abs().max().item() <= FP32_TOL
    assert got.transpose(1, 2).is_contiguous()                              # written in to_out's layout


def test_dual_attention_rejects_unsupported_head_dim():
    with pytest.raises(ValueError, match="head dim 48"):
        dual_attention(*qkv(1, 1, 8, 48, 40), 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dual_attention_half_precision_on_gpu(dtype):
    t = qkv(2, 10, 1024, 64, 60, dtype)
    got = dual_attention(*t, 0.8).float()
    want = dual_attention_reference(*[x.float() for x in t], 0.8)
    assert (got - want).abs().max().item() <= (2e-2 if dtype == torch.bfloat16 else 4e-3)


@pytest.mark.slow
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_dual_attention_unet_step_matches_reference_processors(bundle, monkeypatch, fused_qkv):
    """Whole UNet step: kernel processors on the fused UNet vs the release's unfused LoRA processors; with
    fused projections the kernel reads K/V as strided halves of one K|V GEMM output."""

    import storymaker_serve.kernels.dual_attention as kd
    from storymaker_serve.runtime.attention import use_fused_projections

    # model and inputs on the test device: on a GPU the kernel runs natively only on CUDA tensors
    (ref, _), (fused, _) = unet_with(bundle, fuse=False), unet_with(bundle, fuse=True)
    ref, fused = ref.to(DEV), fused.to(DEV)
    assert use_dual_attention_kernel(fused) == len(fused.attn_processors) // 2
    if fused_qkv:
        use_fused_projections(fused)
    calls = []
    real = kd.dual_attention
    monkeypatch.setattr(kd, "dual_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = to_device(unet_inputs(ref, t_img=60), DEV)
    with torch.no_grad(), exact_fp32():
        want = ref(**x).sample
        got = fused(**x, cross_attention_kwargs={"ip_scale": torch.tensor([0.8, 0.8], device=DEV)}).sample
    assert len(calls) == len(fused.attn_processors) // 2                    # the kernel ran in every cross-attention
    assert (got - want).abs().max().item() <= 1e-4


def to_device(x, dev):
    if torch.is_tensor(x):
        return x.to(dev)
    return {k: to_device(v, dev) for k, v in x.items()} if isinstance(x, dict) else x


def test_kernel_requested_where_it_cannot_run_fails_loudly(bundle, monkeypatch):
    """A run that asks for the kernel where it cannot run must not measure two SDPA calls while reporting the
    kernel: on CUDA (or strict) it raises with the reason; where a fallback is allowed the reason is logged."""

    import storymaker_serve.runtime.kernel_attention as ka

    monkeypatch.setattr(ka, "kernel_unavailable", lambda device: "needs OpenAI Triton >= 3.4, found 3.1.0")
    unet, _ = unet_with(bundle, fuse=True)
    with pytest.raises(ka.KernelUnavailable, match="Triton >= 3.4"):
        use_dual_attention_kernel(unet, device="cuda")
    with pytest.raises(ka.KernelUnavailable, match="found 3.1.0"):
        use_dual_attention_kernel(unet, strict=True)
    assert use_dual_attention_kernel(unet, device="cpu") > 0     # allowed fallback off-GPU


def test_kernel_refuses_an_old_triton(monkeypatch):
    """The version gate is real: importing the kernel module under an older Triton raises an ImportError that
    names the minimum version, which kernel_unavailable reports."""
    import importlib
    import sys

    import triton

    import storymaker_serve.runtime.kernel_attention as ka

    monkeypatch.setattr(triton, "__version__", "3.1.0")
    monkeypatch.delitem(sys.modules, "storymaker_serve.kernels.dual_attention")
    with pytest.raises(ImportError, match=r"Triton >= 3\.4, found 3\.1\.0"):
        importlib.import_module("storymaker_serve.kernels.dual_attention")
    assert "3.4" in ka.kernel_unavailable("cuda")
    monkeypatch.undo()
    importlib.import_module("storymaker_serve.kernels.dual_attention")
    assert ka.kernel_unavailable("cuda") is None


def test_kernel_benchmark_passes_device_tensors_and_asks_for_the_median(monkeypatch):
    """benchmarks.dual_attention: ip_scale is a device tensor (a Python float costs a blocking host->device copy
    per call), the wrapper makes no host tensor for a float either, and do_bench is asked for the median."""
    import triton.testing

    from storymaker_serve.benchmarks import dual_attention as bench

    seen = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: seen.append(kw) or (fn(), 1.0)[1])
    assert bench.median_ms(lambda: None) == 1.0 and seen[0]["return_mode"] == "median"
    x = bench.inputs(1, 1, 16, 32, 40, DEV, torch.float32)
    assert torch.is_tensor(x["ip_scale"]) and x["ip_scale"].device == x["q"].device
    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    rows = bench.measure([(1, 1, 16, 32)], DEV, lambda fn: (fn(), 2.0)[1], n_imgs=(40,), dtype=torch.float32)
    dual_attention(x["q"], x["k_t"], x["v_t"], x["k_ip"], x["v_ip"], 0.8)          # a float scale
    assert made == []                                                                # no host tensor per call
    assert rows[0]["timing"] == "median" and rows[0]["max_abs_err"] <= FP32_TOL


def test_dual_attention_processor_falls_back_with_a_mask():
    p = KernelAttnProcessor(64, 128, rank=0, ip=True)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 10, 64, generator=g)
    k, v = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    ki, vi = torch.randn(1, 40, 64, generator=g), torch.randn(1, 40, 64, generator=g)
    mask = torch.zeros(1, 1, 10, 77)
    got = p.dual_attention(q, k, v, ki, vi, 2, mask, 0.5)
    from storymaker_serve.runtime.attention import StoryMakerAttnProcessor

    want = StoryMakerAttnProcessor.dual_attention(p, q, k, v, ki, vi, 2, mask, 0.5)
    assert torch.equal(got, want)
