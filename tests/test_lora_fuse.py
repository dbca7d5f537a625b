"""(b) The LoRA-fused UNet equals the release's unfused LoRA processors (<= 1e-5 max abs)."""
import pytest
import torch
from helpers import unet_inputs, unet_with

from storymaker_serve.runtime.adapter import set_ip_scale
from storymaker_serve.runtime.attention import StoryMakerAttnProcessor
from storymaker_serve.runtime.loaders import load_sdxl

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(bundle):
    return unet_with(bundle, fuse=False), unet_with(bundle, fuse=True)


@pytest.mark.parametrize("t_img", [40, 60, 80])
def test_fused_equals_unfused(pair, t_img):
    (ref, _), (fused, _) = pair
    x = unet_inputs(ref, t_img)
    with torch.no_grad():
        a = ref(**x).sample
        b = fused(**x).sample
    err = (a - b).abs().max().item()
    assert err <= TOL, err
    assert a.abs().max() > 0.1  # not a trivially small output


def test_fused_weight_is_exact_formula(bundle, pair):
    (_, ip), (fused, _) = pair
    base = load_sdxl(bundle / "sdxl").unet
    name = next(n for n in base.attn_processors if n.endswith("attn2.processor"))
    idx = list(base.attn_processors).index(name)
    path = name.rsplit(".", 1)[0]
    w0 = base.get_submodule(path).to_k.weight.double()
    want = w0 + 0.8 * ip[f"{idx}.to_k_lora.up.weight"].double() @ ip[f"{idx}.to_k_lora.down.weight"].double()
    got = fused.get_submodule(path).to_k.weight.double()
    assert (got - want).abs().max() < 1e-7
    assert (want - w0).abs().max() > 1e-3  # the LoRA delta is not negligible in the demo bundle


def test_fused_unet_is_plain_plus_ip_layers(pair):
    (_, _), (fused, _) = pair
    procs = list(fused.attn_processors.values())
    assert all(isinstance(p, StoryMakerAttnProcessor) and p.rank == 0 for p in procs)
    assert sum(p.ip for p in procs) == len(procs) // 2
    assert not any("lora" in k for k in fused.state_dict())


def test_ip_scale_is_a_runtime_input(pair):
    (_, _), (fused, _) = pair
    x = unet_inputs(fused)
    with torch.no_grad():
        a = fused(**x, cross_attention_kwargs={"ip_scale": torch.tensor(0.8)}).sample
        b = fused(**x, cross_attention_kwargs={"ip_scale": torch.tensor(0.3)}).sample
        set_ip_scale(fused, 0.3)
        c = fused(**x).sample
        set_ip_scale(fused, 0.8)
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(b, c, atol=1e-6)


def test_lora_scale_zero_is_base_unet(bundle):
    (lora0, _), base = unet_with(bundle, fuse=True, lora_scale=0.0), load_sdxl(bundle / "sdxl").unet
    fused = lora0.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(v, fused[k]), k


def test_fused_projections_equal_separate_ones(bundle, pair):
    """torch-opt's fused_qkv: one GEMM for Q|K|V, K|V, K_ip|V_ip; same output, no weight stored twice."""
    from storymaker_serve.runtime.attention import use_fused_projections

    (_, _), (fused, _) = pair
    qkv, _ = unet_with(bundle, fuse=True)
    before = {n: p.data_ptr() for n, p in qkv.named_parameters()}
    assert use_fused_projections(qkv) == len(qkv.attn_processors)
    procs = list(qkv.attn_processors.values())
    assert all((p.qkv is not None) != (p.kv is not None) for p in procs)
    assert sum(p.kv_ip is not None for p in procs) == len(procs) // 2
    name = next(n for n in qkv.attn_processors if n.endswith("attn1.processor"))
    attn = qkv.get_submodule(name[: -len(".processor")])
    p = attn.processor
    assert attn.to_k.weight.data_ptr() == p.qkv.weight[attn.to_q.weight.shape[0]:].data_ptr()   # a view, not a copy
    storages = {t.untyped_storage().data_ptr() for t in qkv.parameters()}
    assert len(storages) < len(before)                 # projections now share the fused buffers
    for t_img in (40, 80):
        x = unet_inputs(fused, t_img)
        with torch.no_grad():
            a, b = fused(**x).sample, qkv(**x).sample
        assert (a - b).abs().max().item() <= TOL


def test_fused_projections_need_fused_lora(pair):
    from storymaker_serve.runtime.attention import use_fused_projections

    (ref, _), _ = pair
    with pytest.raises(ValueError, match="fuse the LoRA"):
        use_fused_projections(ref)
