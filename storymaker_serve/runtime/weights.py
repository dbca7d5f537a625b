"""Where a user's weight files are: the layout of a weights folder, Hugging Face cache entries, and the CLIP image
encoder given as one file. Nothing here downloads anything; every error says what was found and where the
missing file comes from.

A weights folder is searched by content as well as by name, so the StoryMaker release's own layout
(`checkpoints/mask.bin`, `models/buffalo_l/`, the base model and image encoder folders under their repository
names) works as it is, and so does this project's (`sdxl/`, `mask.bin`, `image_encoder/`, `buffalo_l/`,
`controlnet/`). Any path may be a Hugging Face cache entry (`models--ORG--NAME`, resolved through its
`refs/main` with huggingface_hub's own cache functions, or one of its `snapshots/REV` folders).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from transformers import CLIPVisionConfig

from storymaker_serve.runtime.errors import WeightsError

# where each part comes from (the commands in docs/weights.md)
SOURCES = {
    "sdxl": "an SDXL base model in diffusers layout: hf download stabilityai/stable-diffusion-xl-base-1.0 "
            "--local-dir WEIGHTS/sdxl (docs/weights.md lists the files)",
    "mask_bin": "the StoryMaker adapter, 3.32 GB: hf download RED-AIGC/StoryMaker mask.bin --local-dir WEIGHTS",
    "image_encoder": "the CLIP ViT-H/14 image encoder: hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                     "config.json model.safetensors --local-dir WEIGHTS/image_encoder",
    "buffalo_l": "insightface buffalo_l (det_10g.onnx, w600k_r50.onnx): unpack buffalo_l.zip from insightface's "
                 "GitHub release v0.7 into WEIGHTS/buffalo_l",
}
NAMES = {  # the names each part is looked for under, in order
    "sdxl": ("sdxl", "sdxl.safetensors"),
    "mask_bin": ("mask.bin", "checkpoints/mask.bin", "storymaker/mask.bin"),
    "image_encoder": ("image_encoder", "clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "buffalo_l": ("buffalo_l", "models/buffalo_l"),
    "controlnet": ("controlnet",),
    "sdxl_config": ("sdxl_config",),
}
FILE_PARTS = {"mask_bin": ("mask.bin", "checkpoints/mask.bin")}   # parts that are one file: found inside a folder


@dataclass
class WeightsLayout:
    sdxl: Path
    mask_bin: Path
    image_encoder: Path
    buffalo_l: Path | None = None
    controlnet: Path | None = None
    sdxl_config: Path | None = None      # config + tokenizer folder for a single-file SDXL checkpoint
    style_loras: list[tuple[Path, float]] = field(default_factory=list)

    @classmethod
    def resolve(cls, weights: Path | str | None = None, style_loras=None, **parts) -> WeightsLayout:
        """A layout from a weights folder, from components given one by one (sdxl, mask_bin, image_encoder,
        buffalo_l, controlnet, sdxl_config), or both (the parts override the folder's). Any path may be a local
        Hugging Face cache entry; nothing is downloaded."""
        parts = {k: part_path(k, v) for k, v in parts.items() if v is not None}
        loras = [(lora_path(p), s) for p, s in (style_loras or [])]
        if weights is not None:
            return cls.from_dir(hf_cache_path(weights), style_loras=loras, **parts)
        missing = [k for k in ("sdxl", "mask_bin", "image_encoder") if k not in parts]
        if missing:
            raise WeightsError("without --weights DIR give every required component: "
                               + ", ".join(f"--{m.replace('_', '-')}" for m in missing) + " missing")
        for k, v in parts.items():
            require(v, k.replace("_", " "), f"Check the --{k.replace('_', '-')} path.")
        return cls(**parts, style_loras=loras)

    @classmethod
    def from_dir(cls, root: Path | str, **overrides) -> WeightsLayout:
        root = Path(root)
        if not root.is_dir():
            raise WeightsError(f"weights folder {root} does not exist. Pass --weights DIR with sdxl/, mask.bin, "
                               "image_encoder/ (and optionally buffalo_l/, controlnet/), or --demo.")
        found = {part: find_part(root, part) for part in NAMES}
        found.update({k: Path(v) if isinstance(v, (str, Path)) else v for k, v in overrides.items() if v is not None})
        missing = [k for k in ("sdxl", "mask_bin", "image_encoder") if found[k] is None]
        if missing:
            seen = [f"{k} = {v.relative_to(root) if v.is_relative_to(root) else v}" for k, v in found.items()
                    if v is not None and isinstance(v, Path)]
            raise WeightsError(
                f"weights folder {root}: " + "; ".join(f"no {m} (looked for {', '.join(NAMES[m])}; get {SOURCES[m]})"
                                                      for m in missing)
                + f". Found: {', '.join(seen) or 'none of the parts'}. Or pass the paths one by one "
                "(--sdxl, --mask-bin, --image-encoder, ...).")
        return cls(**found)


def find_part(root: Path, part: str) -> Path | None:
    """`part` in a weights folder: under its usual names, else (for the base model and the image encoder) the one
    subfolder whose contents say what it is (a diffusers SDXL pipeline; a CLIP vision model)."""
    hit = next((root / n for n in NAMES[part] if (root / n).exists()), None)
    if hit is not None or part not in ("sdxl", "image_encoder"):
        return hit
    kinds = [d for d in sorted(root.iterdir()) if d.is_dir() and _folder_kind(d) == part]
    return kinds[0] if len(kinds) == 1 else None


def _folder_kind(folder: Path) -> str | None:
    if (folder / "model_index.json").is_file() and (folder / "unet").is_dir():
        return "sdxl"
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return None
        if data.get("model_type") in ("clip", "clip_vision_model") or "vision_config" in data:
            return "image_encoder"
    return None


def hf_cache_path(path: Path | str) -> Path:
    """A local Hugging Face cache entry given as a path: `models--ORG--NAME` resolves to the snapshot its
    `refs/main` names (huggingface_hub's own resolution, offline), or its only snapshot; a `snapshots/REV` folder
    is used as it is. Any other path is returned unchanged."""
    p = Path(path).expanduser()
    if not (p.name.startswith(("models--", "datasets--")) and (p / "snapshots").is_dir()):
        return p

    kind, _, repo = p.name.partition("--")
    try:
        return Path(snapshot_download(repo.replace("--", "/"), repo_type=kind.rstrip("s"), cache_dir=p.parent,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        snaps = sorted(s for s in (p / "snapshots").iterdir() if s.is_dir())
        if len(snaps) == 1:
            return snaps[0]
        raise WeightsError(f"{p}: a Hugging Face cache entry with {len(snaps)} snapshots and no refs/main; pass "
                           "the snapshot folder itself (models--ORG--NAME/snapshots/REV)") from None


def part_path(part: str, path: Path | str) -> Path:
    """A component flag's path: cache entries resolved; for a part that is one file (mask.bin), a folder given
    instead (a cache entry, the release's checkout) is searched for it."""
    p = hf_cache_path(path)
    if part in FILE_PARTS and p.is_dir():
        hit = next((p / n for n in FILE_PARTS[part] if (p / n).is_file()), None)
        if hit is None:
            raise WeightsError(f"{p}: a folder without {' or '.join(FILE_PARTS[part])}; get {SOURCES[part]}")
        return hit
    return p


def lora_path(path: Path | str) -> Path:
    """A --lora path: a file, or a folder (a cache entry) holding exactly one .safetensors file."""
    p = hf_cache_path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.safetensors"))
        if len(files) != 1:
            raise WeightsError(f"{p}: a LoRA folder must hold exactly one .safetensors file, found {len(files)}; "
                               "pass the file itself")
        return files[0]
    return p


def require(path: Path, what: str, fix: str) -> Path:
    if not Path(path).exists():
        raise WeightsError(f"{path}: missing ({what}). {fix}")
    return Path(path)


# ---- the CLIP image encoder as one file (ComfyUI's clip_vision_h.safetensors) ----
VIT_H14 = {"hidden_size": 1280, "patch_size": 14, "image_size": 224}


def clip_file(path: Path) -> Path | None:
    """The single-file form of the image encoder: a .safetensors file, or a folder without config.json holding
    exactly one. None for a transformers folder."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir() and not (p / "config.json").exists():
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise WeightsError(f"{p}: neither a transformers image encoder folder (config.json + model.safetensors) "
                           f"nor one .safetensors file (found {len(files)}); get {SOURCES['image_encoder']}")
    return None


def clip_file_config(file: Path):
    """A CLIPVisionConfig read off a single-file CLIP ViT-H/14 vision checkpoint's tensor shapes (transformers key
    names, as ComfyUI's clip_vision_h.safetensors has them). Other architectures or OpenCLIP key names are refused
    with the file to get instead: their activation and head count cannot be read off the shapes."""
    try:
        with safe_open(str(file), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - not a safetensors file
        raise WeightsError(f"{file}: not a readable .safetensors file ({e}); get {SOURCES['image_encoder']}") from None
    patch = shapes.get("vision_model.embeddings.patch_embedding.weight")
    if patch is None:
        kind = "an OpenCLIP checkpoint" if any(k.startswith("visual.") for k in shapes) else "not a CLIP vision model"
        raise WeightsError(f"{file}: {kind} (no vision_model.* keys in transformers layout); get "
                           f"{SOURCES['image_encoder']}")
    hidden, _, p, _ = patch
    positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
    image = int(round((positions - 1) ** 0.5)) * p
    if (hidden, p, image) != (VIT_H14["hidden_size"], VIT_H14["patch_size"], VIT_H14["image_size"]):
        raise WeightsError(f"{file}: a CLIP vision model of width {hidden}, patch {p}, image {image}; StoryMaker "
                           f"uses CLIP ViT-H/14 (1280, 14, 224): get {SOURCES['image_encoder']}")
    layers = len({k.split(".")[3] for k in shapes if k.startswith("vision_model.encoder.layers.")})
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=shapes[
        "vision_model.encoder.layers.0.mlp.fc1.weight"][0], num_hidden_layers=layers, num_attention_heads=16,
        image_size=image, patch_size=p, projection_dim=shapes.get("visual_projection.weight", (1024,))[0],
        hidden_act="gelu", layer_norm_eps=1e-5)


def image_encoder_config(path: Path):
    """The image encoder's CLIPVisionConfig, from a transformers folder or a single file, without the weights."""
    file = clip_file(path)
    return clip_file_config(file) if file else CLIPVisionConfig.from_pretrained(str(path))
