"""Loaders: weights layout, missing/mismatched files with clear errors, style LoRAs fused exactly."""
import shutil

import pytest
import torch
from safetensors.torch import save_file

from storymaker_serve.runtime.errors import WeightsError
from storymaker_serve.runtime.loaders import fuse_style_loras, load_sdxl, load_storymaker
from storymaker_serve.runtime.weights import WeightsLayout

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"


def test_layout_finds_conventional_names(layout, bundle):
    assert layout.sdxl == bundle / "sdxl" and layout.mask_bin == bundle / "mask.bin"
    assert layout.buffalo_l == bundle / "buffalo_l" and layout.controlnet == bundle / "controlnet"


def test_missing_weight_file_is_named(bundle, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(bundle, w, ignore=shutil.ignore_patterns("mask.bin"))
    with pytest.raises(WeightsError, match=r"no mask_bin \(looked for mask.bin.*RED-AIGC/StoryMaker"):
        WeightsLayout.from_dir(w)
    (w / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="vae"):
        load_sdxl(w / "sdxl")
    with pytest.raises(WeightsError, match="does not exist"):
        WeightsLayout.from_dir(tmp_path / "nope")


def test_single_file_needs_local_config(tmp_path):
    f = tmp_path / "sdxl.safetensors"
    save_file({"x": torch.zeros(1)}, f)
    with pytest.raises(WeightsError, match="needs a local config folder.*Nothing is downloaded"):
        load_sdxl(f)


def test_adapter_for_another_width_rejected(bundle, tmp_path):
    from storymaker_serve.runtime.loaders import load_mask_bin

    proj, ip = load_mask_bin(bundle / "mask.bin")
    proj = {k: v for k, v in proj.items()}
    proj["pos_embed"] = torch.zeros(3, 20, 256)   # D=256 resampler into a D=128 UNet
    w = tmp_path / "w"
    shutil.copytree(bundle, w)
    torch.save({"image_proj_model": proj, "ip_adapter": ip}, w / "mask.bin")
    with pytest.raises(WeightsError, match="pos_embed: got \\(3, 20, 256\\), expected \\(3, 20, 128\\)"):
        load_storymaker(WeightsLayout.from_dir(w))


def _base_weight(bundle):
    return load_sdxl(bundle / "sdxl").unet.get_submodule(ATTN).to_q.weight.detach().clone()


def test_style_lora_diffusers_format(bundle, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    parts = load_sdxl(bundle / "sdxl")
    parts.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    sd = get_peft_model_state_dict(parts.unet)
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=sd, safe_serialization=True)
    a, b = sd[f"{ATTN}.to_q.lora_A.weight"], sd[f"{ATTN}.to_q.lora_B.weight"]

    fresh = load_sdxl(bundle / "sdxl")
    w0 = fresh.unet.get_submodule(ATTN).to_q.weight.detach().clone()
    fuse_style_loras(fresh, [(tmp_path / "pytorch_lora_weights.safetensors", 0.5)])
    w1 = fresh.unet.get_submodule(ATTN).to_q.weight
    want = w0 + 0.5 * b @ a  # alpha == rank: diffusers-format files carry no alpha
    assert (w1 - want).abs().max() < 1e-5 and (want - w0).abs().max() > 1e-3
    assert type(fresh.unet.get_submodule(ATTN).to_q) is torch.nn.Linear  # unloaded: a plain Linear again


def test_style_lora_kohya_format(bundle, tmp_path):
    g = torch.Generator().manual_seed(0)
    w0 = _base_weight(bundle)
    out_f, in_f = w0.shape
    down, up = torch.randn(4, in_f, generator=g), torch.randn(out_f, 4, generator=g) * 0.1
    key = "lora_unet_" + ATTN.replace(".", "_") + "_to_q"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)},
              tmp_path / "style.safetensors")
    parts = load_sdxl(bundle / "sdxl")
    fuse_style_loras(parts, [(tmp_path / "style.safetensors", 0.7)])
    want = w0 + 0.7 * (2.0 / 4) * up @ down
    assert (parts.unet.get_submodule(ATTN).to_q.weight - want).abs().max() < 1e-5


def test_bad_style_lora(bundle, tmp_path):
    f = tmp_path / "junk.safetensors"
    save_file({"nothing.here": torch.zeros(2)}, f)
    with pytest.raises(WeightsError, match="junk.safetensors"):
        fuse_style_loras(load_sdxl(bundle / "sdxl"), [(f, 1.0)])
    with pytest.raises(WeightsError, match="missing"):
        fuse_style_loras(load_sdxl(bundle / "sdxl"), [(tmp_path / "absent.safetensors", 1.0)])


def test_mask_bin_assembled_from_the_documented_key_list(bundle, tmp_path):
    """Not our writer: a mask.bin built from the contract's key list (storymaker-inference.md, "Checkpoint
    mask.bin"): processor i in diffusers' `unet.attn_processors` order holds `{i}.to_{q,k,v,out}_lora.{down,up}
    .weight`, cross-attention ones also `{i}.to_k_ip.weight`/`{i}.to_v_ip.weight`. Values that identify i land in
    the module the documentation names: the fused to_q of that attention and its image-branch projections."""
    from diffusers import UNet2DConditionModel

    from storymaker_serve.runtime.loaders import load_mask_bin

    base = UNet2DConditionModel.from_pretrained(str(bundle / "sdxl" / "unet")).eval()
    d, rank, ip, names = base.config.cross_attention_dim, 4, {}, list(base.attn_processors)
    g = torch.Generator().manual_seed(7)
    for i, name in enumerate(names):
        attn = base.get_submodule(name.rsplit(".processor", 1)[0])
        for lora, lin in (("to_q_lora", attn.to_q), ("to_k_lora", attn.to_k), ("to_v_lora", attn.to_v),
                          ("to_out_lora", attn.to_out[0])):
            ip[f"{i}.{lora}.down.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.1
            ip[f"{i}.{lora}.up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.1
        if name.endswith("attn2.processor"):
            ip[f"{i}.to_k_ip.weight"] = torch.full((attn.to_k.out_features, d), float(i))
            ip[f"{i}.to_v_ip.weight"] = torch.full((attn.to_v.out_features, d), -float(i))
    w = tmp_path / "w"
    shutil.copytree(bundle, w, ignore=shutil.ignore_patterns("mask.bin"))
    proj, _ = load_mask_bin(bundle / "mask.bin")           # the resampler's keys (checked against formulas elsewhere)
    torch.save({"image_proj_model": proj, "ip_adapter": ip}, w / "mask.bin")
    m = load_storymaker(WeightsLayout.from_dir(w), lora_scale=0.5, fuse=True)
    assert len(names) == len(m.sdxl.unet.attn_processors)
    for i, name in enumerate(names):
        path = name.rsplit(".processor", 1)[0]
        lora = ip[f"{i}.to_q_lora.up.weight"] @ ip[f"{i}.to_q_lora.down.weight"]
        want = base.get_submodule(path).to_q.weight + 0.5 * lora
        assert (m.sdxl.unet.get_submodule(path).to_q.weight - want).abs().max() < 1e-5, name
        proc = m.sdxl.unet.attn_processors[name]
        if name.endswith("attn2.processor"):
            assert torch.all(proc.to_k_ip.weight == i) and torch.all(proc.to_v_ip.weight == -i), name


def test_fp16_variant_folders_load(bundle, tmp_path):
    """What most users download: diffusers/transformers folders holding only `*.fp16.safetensors` (written here by
    diffusers/transformers themselves with variant="fp16"). They load, as float32, to the fp16-rounded weights."""
    from diffusers import ControlNetModel, StableDiffusionXLPipeline
    from transformers import CLIPVisionModelWithProjection

    from storymaker_serve.runtime.loaders import load_controlnet, load_image_encoder, weights_variant

    StableDiffusionXLPipeline.from_pretrained(str(bundle / "sdxl")).to(torch.float16).save_pretrained(
        str(tmp_path / "sdxl"), variant="fp16")
    CLIPVisionModelWithProjection.from_pretrained(str(bundle / "image_encoder")).half().save_pretrained(
        str(tmp_path / "image_encoder"), variant="fp16")
    ControlNetModel.from_pretrained(str(bundle / "controlnet")).half().save_pretrained(
        str(tmp_path / "controlnet"), variant="fp16")
    assert next((tmp_path / "sdxl" / "unet").glob("*.safetensors")).name == "diffusion_pytorch_model.fp16.safetensors"
    assert weights_variant(tmp_path / "sdxl") == "fp16" and weights_variant(bundle / "sdxl") is None
    parts = load_sdxl(tmp_path / "sdxl")
    w = parts.unet.get_submodule(ATTN).to_q.weight
    assert w.dtype == torch.float32 and torch.equal(w, _base_weight(bundle).half().float())
    enc = load_image_encoder(tmp_path / "image_encoder")
    assert next(enc.parameters()).dtype == torch.float32
    assert load_controlnet(tmp_path / "controlnet") is not None
