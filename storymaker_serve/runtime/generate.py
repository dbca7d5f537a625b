"""`python -m runtime.generate`: in-process StoryMaker generation (PyTorch: reference or torch-opt backend).

Either a story YAML (`--story`, see runtime/story.py) or one frame from
`--prompt` and `--character PHOTO,MASK[,FACE_JSON]` (repeat for 2-3
characters). Weights come from `--weights DIR` (see runtime/loaders.py for the
layout; `python -m export.demo_bundle DIR` writes a tiny random one). Writes
PNGs, `contact_sheet.png` and `settings.json` to `--out`. `--backend
torch-opt` runs runtime/fast.py (LoRA fused, host-precomputed UniPC, and the
optimisation flags: `--fused-qkv`, `--channels-last`, `--cuda-graph`,
`--compile`, `--dual-attention-kernel`); `reference` (default) the release's
computation.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from storymaker_serve.runtime.cli import (
    add_component_args,
    add_sampling_args,
    argument_parser,
    component_paths,
    configure_logging,
    sampling_overrides,
)
from storymaker_serve.runtime.errors import StoryMakerError
from storymaker_serve.runtime.fast import FastOptions, FastPipeline
from storymaker_serve.runtime.few_step import sampling_defaults
from storymaker_serve.runtime.loaders import load_storymaker
from storymaker_serve.runtime.story import Frame, LocalStoryMaker, Story, check_story, run_story
from storymaker_serve.runtime.weights import WeightsLayout

if TYPE_CHECKING:
    from storymaker_serve.runtime.story import Story

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


DEFAULT_DEVICE = _default_device()


def _lora(s: str) -> tuple[Path, float]:
    file, _, scale = s.rpartition(":")
    try:
        return (Path(file), float(scale)) if file else (Path(s), 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora expects FILE or FILE:SCALE, got {s!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argument_parser("python -m runtime.generate", __doc__.split("\n\n", 1)[1])
    ap.add_argument("--weights", type=Path, help="weights folder (sdxl/, mask.bin, image_encoder/, ...); or give the "
                                                 "components one by one")
    add_component_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--story", type=Path, help="story YAML: characters once, a list of frames")
    src.add_argument("--prompt", help="a single frame's prompt (with --character)")
    ap.add_argument("--character", action="append", default=[], metavar="PHOTO,MASK[,FACE_JSON]",
                    help="a character of a --prompt frame (repeat for 2-3)")
    ap.add_argument("--cloth", action="append", default=[], metavar="INDEX:IMAGE",
                    help="cloth swap for character INDEX (1-based)")
    ap.add_argument("--pose", type=Path, help="OpenPose map for the ControlNet (needs controlnet/ in the weights)")
    ap.add_argument("--out", type=Path, default=Path("out/generate"), help="output folder")
    ap.add_argument("--lora", type=_lora, action="append", default=[], metavar="FILE[:SCALE]",
                    help="style LoRA to fuse")
    add_sampling_args(ap)
    ap.add_argument("--lora-scale", type=float, default=0.8, help="StoryMaker LoRA scale (fused at load)")
    ap.add_argument("--identity-only", action="store_true", help="zero the character-image tokens (face identity only)")
    ap.add_argument("--interpolation", type=float, help="blend characters 1 and 2 with this weight")
    ap.add_argument("--device", default=DEFAULT_DEVICE, help="torch device (default: cuda when a GPU is visible)")
    ap.add_argument("--dual-attention-kernel", action="store_true",
                    help="fused Triton kernel for the decoupled cross-attention (CUDA; reference elsewhere)")
    ap.add_argument("--precision", choices=sorted(DTYPES),
                    help="model precision (default: fp16 on CUDA, fp32 elsewhere; the VAE stays fp32)")
    ap.add_argument("--backend", choices=("reference", "torch-opt"), default="reference")
    opt = ap.add_argument_group("torch-opt flags (with --backend torch-opt)")
    opt.add_argument("--fused-qkv", action="store_true", help="one GEMM for Q|K|V (self) and K|V, K_ip|V_ip (cross)")
    opt.add_argument("--channels-last", action="store_true", help="UNet/VAE/ControlNet in channels_last")
    opt.add_argument("--offload-encoders", action="store_true",
                     help="CLIP vision + resampler on the host between character encodings (less GPU memory)")
    opt.add_argument("--cuda-graph", action="store_true", help="replay the UNet step as a CUDA graph (CUDA only)")
    opt.add_argument("--compile", action="store_true", help="torch.compile the UNet (max-autotune; slow first frame)")
    a = ap.parse_args(argv)
    if a.precision is None:
        a.precision = "fp16" if str(a.device).startswith("cuda") else "fp32"
    extra = [f for f in ("fused_qkv", "channels_last", "offload_encoders", "cuda_graph", "compile") if getattr(a, f)]
    if extra and a.backend != "torch-opt":
        ap.error(f"--{extra[0].replace('_', '-')} needs --backend torch-opt")
    return a


def make_pipeline(a, models):
    """The in-process pipeline the CLI asked for."""
    if a.backend == "reference":
        from storymaker_serve.runtime.pipeline import StoryMakerPipeline

        return StoryMakerPipeline(models)

    return FastPipeline(models, FastOptions(precision=a.precision, dual_attention_kernel=a.dual_attention_kernel,
                                            fused_qkv=a.fused_qkv, channels_last=a.channels_last,
                                            offload_encoders=a.offload_encoders,
                                            cuda_graph=a.cuda_graph, compile=a.compile))


def _single_frame_story(a) -> Story:
    if not a.character:
        raise StoryMakerError("--prompt needs at least one --character PHOTO,MASK[,FACE_JSON]")
    chars = []
    for i, spec in enumerate(a.character):
        parts = spec.split(",")
        if len(parts) not in (2, 3):
            raise StoryMakerError(f"--character {spec!r}: expected PHOTO,MASK or PHOTO,MASK,FACE_JSON")
        chars.append({"name": f"character{i + 1}", "photo": parts[0], "mask": parts[1],
                      "face": (parts[2:] or [None])[0]})
    cloth = {}
    for c in a.cloth:
        idx, _, img = c.partition(":")
        cloth[f"character{int(idx)}"] = img
    frame = Frame(a.prompt, cloth=cloth, pose=str(a.pose) if a.pose else None, identity_only=a.identity_only,
                  interpolation=a.interpolation)
    return Story(chars, [frame], {})


def main(argv=None) -> int:
    a = parse_args(argv)
    configure_logging(a)
    try:
        story = Story.load(a.story) if a.story else _single_frame_story(a)
        overrides = sampling_overrides(a)
        base = sampling_defaults(a.lora)                # a few-step LoRA's recommended sampler, steps, guidance
        if base:
            print(f"few-step LoRA: sampling defaults {base} (the story's and the flags' own values win)", flush=True)
        check_story(story, overrides, base)             # the story's own mistakes first, before the weights load
        if a.story and (a.identity_only or a.interpolation is not None):
            for f in story.frames:
                f.identity_only = f.identity_only or a.identity_only
                f.interpolation = a.interpolation if a.interpolation is not None else f.interpolation
        t0 = time.perf_counter()
        print(f"loading weights from {a.weights or 'the given components'} ...", flush=True)
        layout = WeightsLayout.resolve(a.weights, style_loras=a.lora or None, **component_paths(a))
        models = load_storymaker(layout, lora_scale=a.lora_scale, dtype=getattr(torch, DTYPES[a.precision]),
                                 device=a.device,   # torch-opt installs the kernel itself (FastOptions)
                                 dual_attention_kernel=a.dual_attention_kernel and a.backend == "reference")
        print(f"loaded in {time.perf_counter() - t0:.1f} s; {a.backend} backend; generating {len(story.frames)} "
              "frame(s) "
              f"with {len(story.characters)} character(s)", flush=True)
        pipeline = LocalStoryMaker(make_pipeline(a, models))
        paths = run_story(pipeline, story, a.out, overrides, progress=lambda s: print(s, flush=True), base=base)
    except StoryMakerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} frame(s), contact_sheet.png and settings.json to {a.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
