"""Where a user's weights are: the StoryMaker release's own layout, Hugging Face cache entries for every weight
flag, errors that say what was found and where the missing file comes from, and the CLIP image encoder as one
file (the layout ComfyUI users have)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from storymaker_serve.export.build import main as build_main
from storymaker_serve.runtime.errors import WeightsError
from storymaker_serve.runtime.loaders import load_image_encoder
from storymaker_serve.runtime.weights import (
    SOURCES,
    WeightsLayout,
    clip_file_config,
    hf_cache_path,
    image_encoder_config,
)


def _link(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())
    return dst


@pytest.fixture
def release_layout(bundle, tmp_path):
    """The StoryMaker release's checkout: checkpoints/mask.bin, models/buffalo_l, the base model and the image
    encoder in folders named after their repositories."""
    root = tmp_path / "StoryMaker"
    _link(bundle / "mask.bin", root / "checkpoints" / "mask.bin")
    _link(bundle / "buffalo_l", root / "models" / "buffalo_l")
    _link(bundle / "sdxl", root / "YamerMIX_v11")
    _link(bundle / "image_encoder", root / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    return root


def test_the_release_layout_is_found(release_layout):
    layout = WeightsLayout.from_dir(release_layout)
    assert layout.mask_bin == release_layout / "checkpoints" / "mask.bin"
    assert layout.buffalo_l == release_layout / "models" / "buffalo_l"
    assert layout.sdxl == release_layout / "YamerMIX_v11"
    assert layout.image_encoder == release_layout / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    (release_layout / "CLIP-ViT-H-14-laion2B-s32B-b79K").rename(release_layout / "my_clip")   # found by content
    assert WeightsLayout.from_dir(release_layout).image_encoder == release_layout / "my_clip"


@pytest.mark.slow
def test_the_release_layout_builds(release_layout, tmp_path, capsys):
    assert build_main(["--weights", str(release_layout), "--out", str(tmp_path / "b"), "--components", "ppr"]) == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["components"]["ppr"]["parity"]["passed"]


def test_a_missing_part_names_what_was_found_and_where_it_comes_from(release_layout):
    (release_layout / "checkpoints" / "mask.bin").unlink()
    with pytest.raises(WeightsError) as e:
        WeightsLayout.from_dir(release_layout)
    msg = str(e.value)
    assert "no mask_bin (looked for mask.bin, checkpoints/mask.bin, storymaker/mask.bin" in msg
    assert "hf download RED-AIGC/StoryMaker mask.bin" in msg and "3.32 GB" in msg
    assert "Found: sdxl = YamerMIX_v11" in msg and "buffalo_l = models/buffalo_l" in msg


def _cache_entry(hub, repo, files: dict):
    """A Hugging Face cache entry (blobs, snapshots/REV of relative links, refs/main) holding `files`
    {path in repo: source file}."""
    entry = hub / f"models--{repo.replace('/', '--')}"
    for rel, src in files.items():
        blob = entry / "blobs" / f"{abs(hash(rel)):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(src.read_bytes())
        link = entry / "snapshots" / "abc123" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text("abc123")
    return entry


def _tree(folder):
    return {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}


def test_every_weight_flag_takes_a_cache_entry(bundle, tmp_path):
    hub = tmp_path / "hub"
    entries = {
        "sdxl": _cache_entry(hub, "org/sdxl", _tree(bundle / "sdxl")),
        "mask_bin": _cache_entry(hub, "RED-AIGC/StoryMaker", {"mask.bin": bundle / "mask.bin"}),
        "image_encoder": _cache_entry(hub, "laion/clip", _tree(bundle / "image_encoder")),
        "buffalo_l": _cache_entry(hub, "org/buffalo_l", _tree(bundle / "buffalo_l")),
        "controlnet": _cache_entry(hub, "org/controlnet", _tree(bundle / "controlnet")),
    }
    layout = WeightsLayout.resolve(**entries)
    snap = lambda part: entries[part] / "snapshots" / "abc123"
    assert layout.mask_bin == snap("mask_bin") / "mask.bin" and layout.mask_bin.is_file()
    for part in ("sdxl", "image_encoder", "buffalo_l", "controlnet"):
        assert getattr(layout, part) == snap(part), part
    assert hf_cache_path(snap("sdxl")) == snap("sdxl")
    with pytest.raises(WeightsError, match="a folder without mask.bin or checkpoints/mask.bin"):
        WeightsLayout.resolve(**{**entries, "mask_bin": entries["sdxl"]})


def _vit_h_shape_file(path, projection=True, openclip=False):
    """A file with the key names and shapes of CLIP ViT-H/14's vision tower where the config is read from them
    (small placeholder tensors elsewhere)."""
    if openclip:
        save_file({"visual.conv1.weight": torch.zeros(1280, 3, 14, 14, dtype=torch.float16)}, str(path))
        return path
    t = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(1280, 3, 14, 14, dtype=torch.float16),
         "vision_model.embeddings.position_embedding.weight": torch.zeros(257, 1280, dtype=torch.float16),
         "vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(5120, 1280, dtype=torch.float16)}
    t.update({f"vision_model.encoder.layers.{i}.layer_norm1.weight": torch.zeros(1) for i in range(1, 32)})
    if projection:
        t["visual_projection.weight"] = torch.zeros(1024, 1280, dtype=torch.float16)
    save_file(t, str(path))
    return path


def test_single_file_clip_config_is_read_off_its_shapes(tmp_path):
    cfg = clip_file_config(_vit_h_shape_file(tmp_path / "clip_vision_h.safetensors"))
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (1280, 5120,
                                                                                                         32, 16)
    assert (cfg.image_size, cfg.patch_size, cfg.projection_dim, cfg.hidden_act) == (224, 14, 1024, "gelu")
    alone = tmp_path / "clip_vision"
    alone.mkdir()
    _vit_h_shape_file(alone / "clip_vision_h.safetensors")
    assert image_encoder_config(alone).hidden_size == 1280               # alone in a folder: the same file


def test_other_single_files_are_refused_with_the_file_to_get(bundle, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    small = tmp_path / "small.safetensors"
    save_file(CLIPVisionModelWithProjection.from_pretrained(str(bundle / "image_encoder")).state_dict(), str(small))
    for path, text in ((small, "a CLIP vision model of width 128"),
                       (_vit_h_shape_file(tmp_path / "open.safetensors", openclip=True), "an OpenCLIP checkpoint")):
        with pytest.raises(WeightsError, match=text) as e:
            load_image_encoder(path)
        assert SOURCES["image_encoder"] in str(e.value)


@pytest.mark.slow
def test_single_file_clip_vit_h_loads_as_its_folder(tmp_path):
    """Full size: a random CLIP ViT-H/14 saved as a folder and as one file loads to the same model."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from storymaker_serve.export.sdxl_config import CLIP_VIT_H14

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H14)).eval()
    model.save_pretrained(str(tmp_path / "folder"), safe_serialization=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip_vision_h.safetensors"))
    del model
    a = load_image_encoder(tmp_path / "folder")
    b = load_image_encoder(tmp_path / "clip_vision_h.safetensors")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(a(x, output_hidden_states=True).hidden_states[-2],
                           b(x, output_hidden_states=True).hidden_states[-2])
