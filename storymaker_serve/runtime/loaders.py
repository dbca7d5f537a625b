"""Loaders for the weight formats a StoryMaker user brings (no code path downloads anything).

A weights folder is resolved by `WeightsLayout.from_dir` (conventional names,
each overridable): `sdxl/` (diffusers folder) or `sdxl.safetensors` (single
file, read by diffusers' `from_single_file` with a local config folder),
`mask.bin` (torch.save dict with `image_proj_model` or IP-Adapter-FaceID's
`image_proj`, plus `ip_adapter`), `image_encoder/` (transformers
CLIPVisionModelWithProjection), `buffalo_l/` (insightface ONNX files,
optional: face info may come from JSON instead), `controlnet/` (optional SDXL
ControlNet). Style LoRA files (diffusers or kohya format) are fused into the
UNet and text encoders through diffusers/peft before StoryMaker's own LoRA.
Every failure names the file, what was expected and what to do.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection

from storymaker_serve.runtime.adapter import attach_storymaker, check_state_dict
from storymaker_serve.runtime.errors import WeightsError
from storymaker_serve.runtime.face import FaceAnalyzer
from storymaker_serve.runtime.ppr import PositionalPerceiverResampler, PPRConfig
from storymaker_serve.runtime.weights import SOURCES, WeightsLayout, clip_file, clip_file_config, require

log = logging.getLogger(__name__)


def load_mask_bin(path: Path | str, map_location="cpu") -> tuple[dict, dict]:
    """Return (image_proj state dict, ip_adapter state dict) from a StoryMaker `mask.bin`."""
    path = require(Path(path), "StoryMaker adapter checkpoint", f"Get {SOURCES['mask_bin']}.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, wrong format
        raise WeightsError(f"{path}: cannot be read as a torch checkpoint ({e}).") from None
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}.")
    proj = ckpt.get("image_proj_model", ckpt.get("image_proj"))
    if proj is None or "ip_adapter" not in ckpt:
        raise WeightsError(f"{path}: expected top-level keys 'image_proj_model' (or 'image_proj') and 'ip_adapter', "
                           f"found {sorted(ckpt)[:6]}. Is this a StoryMaker mask.bin?")
    return proj, ckpt["ip_adapter"]


def load_ppr(sd: dict, source: str = "mask.bin") -> PositionalPerceiverResampler:
    try:
        cfg = PPRConfig.from_state_dict(sd)
    except (KeyError, ValueError, IndexError) as e:
        raise WeightsError(f"{source}: `image_proj_model` lacks the resampler key {e}; expected the faceid_plus "
                           "Positional-aware Perceiver Resampler (proj.*, norm.*, perceiver_resampler.*, resample.*, "
                           "pos_embed, bg_embed, proj_out.*, norm_out.*).") from None
    with torch.device("meta"):
        ref = PositionalPerceiverResampler(cfg)
    check_state_dict(sd, {k: tuple(v.shape) for k, v in ref.state_dict().items()}, source, "image_proj_model")
    ppr = PositionalPerceiverResampler(cfg)
    ppr.load_state_dict(sd)
    return ppr.eval()


@dataclass
class SDXLParts:
    unet: object
    vae: object
    text_encoder: object
    text_encoder_2: object
    tokenizer: object
    tokenizer_2: object
    scheduler_config: dict


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_variant(folder: Path) -> str | None:
    """'fp16' when a diffusers/transformers folder holds only the fp16 variant weight files (`*.fp16.safetensors`,
    what most users download), None when it has the default files. Read locally; nothing is downloaded."""
    names = [p.name for p in Path(folder).rglob("*") if p.name.endswith(WEIGHT_SUFFIXES) and "checkpoint" not in p.name
             and "training_args" not in p.name]
    fp16 = [n for n in names if ".fp16." in n]
    return "fp16" if fp16 and len(fp16) == len(names) else None


def load_sdxl(path: Path, config_dir: Path | None = None) -> SDXLParts:
    """SDXL from a diffusers folder (default or fp16-variant files), or from a single .safetensors file plus a local
    config folder. Weights are loaded as float32; pipelines cast them to the precision they run in."""
    path = require(Path(path), "SDXL base model", "Pass a diffusers SDXL folder or a .safetensors checkpoint.")
    if path.is_file():
        if config_dir is None:
            raise WeightsError(f"{path}: a single-file SDXL checkpoint needs a local config folder (model_index.json, "
                               "component configs and both tokenizers, e.g. an SDXL diffusers folder without weights): "
                               "put it at WEIGHTS/sdxl_config/ or pass --sdxl-config DIR. Nothing is downloaded.")
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True)
    else:
        for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
            require(path / sub, f"SDXL component '{sub}'", "The SDXL diffusers folder is incomplete; re-download it.")
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True,
                                                             variant=weights_variant(path), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise WeightsError(f"{path}: SDXL diffusers folder could not be loaded: {e}") from None
    return SDXLParts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                     dict(pipe.scheduler.config))


SDXL_PART_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                     "text_encoder": ("transformers", "CLIPTextModel"),
                     "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")}


def _sdxl_part_class(part: str):
    lib, name = SDXL_PART_CLASSES[part]
    return getattr(importlib.import_module(lib), name)


def load_sdxl_part(path: Path, part: str, config_dir: Path | None = None, style_loras=()):
    """One SDXL component (float32) without loading the others: what a memory-conscious build needs (the full-size
    UNet alone is 10 GB in fp32). A single-file checkpoint, or style LoRAs to fuse (they touch the UNet and both
    text encoders), load the whole pipeline once and keep only `part`."""
    path = require(Path(path), "SDXL base model", "Pass a diffusers SDXL folder or a .safetensors checkpoint.")
    if path.is_file() or style_loras:
        parts = load_sdxl(path, config_dir)
        fuse_style_loras(parts, list(style_loras))
        return getattr(parts, part)
    return _from_pretrained(_sdxl_part_class(part), path / part, f"SDXL component '{part}'",
                            "The SDXL diffusers folder is incomplete; re-download it.")


def sdxl_part_config(path: Path, part: str, config_dir: Path | None = None):
    """A component's config (diffusers FrozenDict / transformers config, defaults filled) read without weights."""
    base = Path(path) if Path(path).is_dir() else config_dir
    if base is None:
        raise WeightsError(f"{path}: a single-file SDXL checkpoint needs its config folder: put it at "
                           "WEIGHTS/sdxl_config/ or pass --sdxl-config DIR. Nothing is downloaded.")
    folder = require(base / part, f"SDXL component '{part}'",
                      "The SDXL diffusers folder is incomplete; re-download it.")
    cls = _sdxl_part_class(part)
    if SDXL_PART_CLASSES[part][0] == "diffusers":
        with torch.device("meta"):
            return cls.from_config(cls.load_config(str(folder))).config
    return cls.config_class.from_pretrained(str(folder))


def check_compatible(unet_cross_attention_dim: int, ppr_cfg: PPRConfig, clip_hidden: int, mask_bin,
                     image_encoder) -> None:
    """The SDXL base, mask.bin and image encoder belong together (checked from configs and shapes)."""
    if ppr_cfg.cross_attention_dim != unet_cross_attention_dim:
        raise WeightsError(f"{mask_bin}: resampler outputs D={ppr_cfg.cross_attention_dim} but the UNet's "
                           f"cross_attention_dim is {unet_cross_attention_dim}; use the SDXL base it was trained with.")
    if clip_hidden != ppr_cfg.clip_dim:
        raise WeightsError(f"{image_encoder}: hidden size {clip_hidden} but {mask_bin} expects "
                           f"CLIP features of width {ppr_cfg.clip_dim} (CLIP ViT-H/14: 1280).")


def fuse_style_loras(parts: SDXLParts, loras: list[tuple[Path, float]]) -> None:
    """Fuse style LoRA files (diffusers/kohya formats, via diffusers + peft) into UNet and text encoders."""
    if not loras:
        return

    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                     text_encoder_2=parts.text_encoder_2,
                                     tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
                                     scheduler=None)
    for i, (file, scale) in enumerate(loras):
        file = require(Path(file), "style LoRA", "Check the --lora FILE:SCALE path.")
        name = f"style{i}"
        try:
            pipe.load_lora_weights(str(file), adapter_name=name)
        except (ValueError, KeyError, OSError) as e:
            raise WeightsError(f"{file}: not a loadable SDXL LoRA (diffusers or kohya format): {e}") from None
        pipe.fuse_lora(lora_scale=scale, adapter_names=[name])
        log.info("fused style LoRA %s at scale %s", file, scale)
    pipe.unload_lora_weights()


def _from_pretrained(cls, path: Path, what: str, fix: str):
    path = require(Path(path), what, fix)
    try:
        return cls.from_pretrained(str(path), local_files_only=True, variant=weights_variant(path),
                                   dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: {what} could not be loaded: {e}") from None


def load_image_encoder(path: Path):
    """The CLIP image encoder from a transformers folder, or from one .safetensors file (ComfyUI's
    clip_vision_h.safetensors: the same tensors, its config read off their shapes)."""
    file = clip_file(require(Path(path), "CLIP image encoder", f"Get {SOURCES['image_encoder']}."))
    if file is None:
        return _from_pretrained(CLIPVisionModelWithProjection, path, "CLIP image encoder",
                                f"Pass the CLIP ViT-H/14 image encoder folder: {SOURCES['image_encoder']}.")
    model = CLIPVisionModelWithProjection(clip_file_config(file))
    state = load_file(str(file))
    if not any(k.startswith("visual_projection.") for k in state):
        raise WeightsError(f"{file}: no visual_projection weights (a CLIP vision tower without its projection); get "
                           f"{SOURCES['image_encoder']}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if "position_ids" not in k] or unexpected:
        raise WeightsError(f"{file}: does not match CLIP ViT-H/14 (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); get {SOURCES['image_encoder']}")
    return model.float().eval()


def load_controlnet(path: Path):
    return _from_pretrained(ControlNetModel, path, "SDXL ControlNet",
                            "Pass a diffusers SDXL ControlNet folder (e.g. an OpenPose model).")


@dataclass
class StoryMakerModels:
    """Everything the reference pipeline runs, loaded once."""

    sdxl: SDXLParts
    ppr: PositionalPerceiverResampler
    image_encoder: object
    lora_scale: float = 0.8              # fused into the UNet (or applied by the unfused processors)
    face_analyzer: object | None = None
    controlnet: object | None = None


def load_storymaker(layout: WeightsLayout, *, lora_scale: float = 0.8, ip_scale: float = 0.8, fuse: bool = True,
                    dtype: torch.dtype = torch.float32, device: str = "cpu",
                    dual_attention_kernel: bool = False) -> StoryMakerModels:
    proj_sd, ip_sd = load_mask_bin(layout.mask_bin)
    parts = load_sdxl(layout.sdxl, layout.sdxl_config)
    fuse_style_loras(parts, layout.style_loras)
    attach_storymaker(parts.unet, ip_sd, lora_scale=lora_scale, ip_scale=ip_scale, fuse=fuse,
                      source=str(layout.mask_bin))
    if dual_attention_kernel:  # fused Triton kernel for text + image attention (raises on CUDA if it cannot run)
        from storymaker_serve.runtime.kernel_attention import use_dual_attention_kernel

        use_dual_attention_kernel(parts.unet, device)
    ppr = load_ppr(proj_sd, str(layout.mask_bin))
    enc = load_image_encoder(layout.image_encoder)
    check_compatible(parts.unet.config.cross_attention_dim, ppr.cfg, enc.config.hidden_size, layout.mask_bin,
                     layout.image_encoder)
    face = FaceAnalyzer.from_folder(layout.buffalo_l) if layout.buffalo_l else None
    cn = load_controlnet(layout.controlnet) if layout.controlnet else None
    for m in (parts.unet, parts.text_encoder, parts.text_encoder_2, ppr, enc, cn):
        if m is None:
            continue
        p = next(m.parameters())
        if p.dtype != dtype or p.device != torch.device(device):
            m.to(device=device, dtype=dtype)
    parts.vae.to(device=device)  # kept in float32: SDXL's VAE overflows in fp16
    return StoryMakerModels(parts, ppr, enc, lora_scale=lora_scale, face_analyzer=face, controlnet=cn)
