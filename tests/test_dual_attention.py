"""Fused dual-stream attention kernel vs the two-SDPA reference (Triton interpreter on CPU, native on a GPU)."""
import pytest
import torch

from kernels.dual_attention import dual_attention, dual_attention_reference
from runtime.kernel_attention import KernelAttnProcessor, use_dual_attention_kernel

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
    if DEV == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
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


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_dual_attention_unet_step_matches_reference_processors(bundle, monkeypatch, fused_qkv):
    """Whole UNet step: kernel processors on the fused UNet vs the release's unfused LoRA processors; with
    fused projections the kernel reads K/V as strided halves of one K|V GEMM output."""
    import kernels.dual_attention as kd
    from runtime.attention import use_fused_projections
    from test_lora_fuse import unet_inputs, unet_with

    (ref, _), (fused, _) = unet_with(bundle, fuse=False), unet_with(bundle, fuse=True)
    assert use_dual_attention_kernel(fused) == len(fused.attn_processors) // 2
    if fused_qkv:
        use_fused_projections(fused)
    calls = []
    real = kd.dual_attention
    monkeypatch.setattr(kd, "dual_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = unet_inputs(ref, t_img=60)
    with torch.no_grad():
        want = ref(**x).sample
        got = fused(**x, cross_attention_kwargs={"ip_scale": torch.tensor([0.8, 0.8])}).sample
    assert len(calls) == len(fused.attn_processors) // 2                    # the kernel ran in every cross-attention
    assert (got - want).abs().max().item() <= 1e-4


def test_dual_attention_processor_falls_back_with_a_mask():
    p = KernelAttnProcessor(64, 128, rank=0, ip=True)
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 10, 64, generator=g), torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    ki, vi = torch.randn(1, 40, 64, generator=g), torch.randn(1, 40, 64, generator=g)
    mask = torch.zeros(1, 1, 10, 77)
    got = p.dual_attention(q, k, v, ki, vi, 2, mask, 0.5)
    from runtime.attention import StoryMakerAttnProcessor

    want = StoryMakerAttnProcessor.dual_attention(p, q, k, v, ki, vi, 2, mask, 0.5)
    assert torch.equal(got, want)
