"""The demo bundle is deterministic and written in the real formats the loaders read."""
import json

import torch
from safetensors.torch import load_file

from storymaker_serve.export.demo_bundle import write_demo_bundle


def test_bundle_is_deterministic(bundle, tmp_path):
    again = write_demo_bundle(tmp_path / "again")
    for rel in ("sdxl/unet/diffusion_pytorch_model.safetensors", "image_encoder/model.safetensors"):
        a, b = load_file(bundle / rel), load_file(again / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    ma, mb = (torch.load(p / "mask.bin", weights_only=True) for p in (bundle, again))
    assert all(torch.equal(ma["ip_adapter"][k], mb["ip_adapter"][k]) for k in ma["ip_adapter"])
    assert (again / "buffalo_l/det_10g.onnx").read_bytes() == (bundle / "buffalo_l/det_10g.onnx").read_bytes()


def test_bundle_formats(bundle):
    from transformers import CLIPTokenizer

    idx = json.loads((bundle / "sdxl/model_index.json").read_text())
    assert idx["unet"] == ["diffusers", "UNet2DConditionModel"] and "tokenizer_2" in idx
    cfg = json.loads((bundle / "sdxl/unet/config.json").read_text())
    assert cfg["addition_embed_type"] == "text_time" and cfg["cross_attention_dim"] == 128
    tok = CLIPTokenizer.from_pretrained(str(bundle / "sdxl/tokenizer_2"))
    ids = tok("a man walking in the park").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 6 + 2  # whole-word merges
    assert tok.pad_token == "!"  # SDXL's second tokenizer pads with "!"
