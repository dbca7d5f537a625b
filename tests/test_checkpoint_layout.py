"""(a) A release-layout mask.bin for the FULL-size SDXL UNet (meta device): 140 processors, keys, shapes."""
import re

import pytest
import torch
from diffusers import UNet2DConditionModel

from storymaker_serve.export.sdxl_config import SDXL_UNET
from storymaker_serve.runtime.adapter import attach_storymaker, check_state_dict, expected_layout
from storymaker_serve.runtime.errors import WeightsError
from storymaker_serve.runtime.loaders import load_mask_bin
from storymaker_serve.runtime.ppr import PositionalPerceiverResampler, PPRConfig


@pytest.fixture(scope="module")
def meta_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


def release_state_dict(unet, rank=128):
    """Written the way the release does it, independently of runtime.adapter: walk attn_processors
    in order, attn1 -> LoRA on q/k/v/out, attn2 -> the same (k/v from 2048) plus to_k_ip/to_v_ip."""
    mods = dict(unet.named_modules())
    sd = {}
    for i, name in enumerate(unet.attn_processors):
        attn = mods[name.rsplit(".", 1)[0]]
        h = attn.to_q.weight.shape[0]
        ctx = h if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        for proj, fin in (("to_q", h), ("to_k", ctx), ("to_v", ctx), ("to_out", h)):
            sd[f"{i}.{proj}_lora.down.weight"] = torch.empty(rank, fin, device="meta")
            sd[f"{i}.{proj}_lora.up.weight"] = torch.empty(h, rank, device="meta")
        if name.endswith("attn2.processor"):
            sd[f"{i}.to_k_ip.weight"] = torch.empty(h, ctx, device="meta")
            sd[f"{i}.to_v_ip.weight"] = torch.empty(h, ctx, device="meta")
    return sd


def test_full_size_mask_bin_layout(meta_unet, tmp_path):
    ip = release_state_dict(meta_unet)
    with torch.device("meta"):
        proj = PositionalPerceiverResampler(PPRConfig()).state_dict()
    path = tmp_path / "mask.bin"
    torch.save({"image_proj_model": proj, "ip_adapter": ip}, path)

    proj_sd, ip_sd = load_mask_bin(path, map_location="meta")
    indices = {int(k.split(".")[0]) for k in ip_sd}
    assert len(meta_unet.attn_processors) == 140 and indices == set(range(140))
    assert len(ip_sd) == 70 * 8 + 70 * 10 == 1260
    assert sum(k.endswith("to_k_ip.weight") for k in ip_sd) == 70
    # first processor: down_blocks.1 (640 wide) self-attention; second: its cross-attention from 2048
    assert tuple(ip_sd["0.to_q_lora.down.weight"].shape) == (128, 640)
    assert tuple(ip_sd["1.to_k_lora.down.weight"].shape) == (128, 2048)
    assert tuple(ip_sd["1.to_k_ip.weight"].shape) == (640, 2048)
    assert all(re.fullmatch(r"\d+\.(to_(q|k|v|out)_lora\.(down|up)|to_[kv]_ip)\.weight", k) for k in ip_sd)
    # our loader derives exactly this layout and accepts it
    check_state_dict(ip_sd, expected_layout(meta_unet, 128), str(path), "ip_adapter")
    cfg = PPRConfig.from_state_dict(proj_sd)
    assert cfg == PPRConfig()  # 2048 / 512 / 1280 / 4 + 16 tokens / depth 4 / 3 characters
    assert tuple(proj_sd["pos_embed"].shape) == (3, 20, 2048) and tuple(proj_sd["bg_embed"].shape) == (1, 20, 2048)


def test_image_proj_alias_is_accepted(tmp_path):
    path = tmp_path / "faceid.bin"
    torch.save({"image_proj": {"a": torch.zeros(1)}, "ip_adapter": {}}, path)
    proj, ip = load_mask_bin(path)
    assert "a" in proj and ip == {}


def test_wrong_keys_name_the_key_and_shape(meta_unet):
    ip = release_state_dict(meta_unet)
    ip["5.to_k_ip.weight"] = torch.empty(640, 768, device="meta")   # SD1.5-sized
    del ip["7.to_q_lora.up.weight"]
    ip["bogus.weight"] = torch.empty(1, device="meta")
    with pytest.raises(WeightsError) as e:
        check_state_dict(ip, expected_layout(meta_unet, 128), "mask.bin", "ip_adapter")
    msg = str(e.value)
    assert "mask.bin" in msg and "7.to_q_lora.up.weight" in msg and "bogus.weight" in msg
    assert "5.to_k_ip.weight: got (640, 768), expected (640, 2048)" in msg


def test_mask_bin_without_required_keys(tmp_path):
    path = tmp_path / "other.bin"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(WeightsError, match="image_proj_model.*ip_adapter"):
        load_mask_bin(path)


def test_attach_rejects_adapter_for_other_unet(bundle, meta_unet):
    _, ip = load_mask_bin(bundle / "mask.bin")
    with pytest.raises(WeightsError, match="does not match"):
        attach_storymaker(meta_unet, ip)
