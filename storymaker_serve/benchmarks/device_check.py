"""`python -m benchmarks.device_check --out DIR`: the GPU figures in one command on a bare single-GPU host.

Made for a host with one large GPU, Python 3.12, a CUDA build of PyTorch, OpenAI Triton, transformers, numpy,
numba and a CPU onnxruntime, no network, and neither diffusers nor TensorRT nor tritonserver: the few packages it
lacks travel as wheels (`requirements/device-wheels.txt`, about 27 MB; docs/performance.md, "Device check", has
the download and install commands). Every model is a full-size random StoryMaker made on the GPU (no disk round
trip). Stages, in priority order, each skipped (and recorded so) when the time budget cannot cover it:

1. `parity`: torch-opt against the reference on the GPU, the same weights (the reference's LoRA fused into a
   copy): image tokens (max abs, cosine) and frames (max uint8 difference), 1024^2, fp16, 4 steps.
2. `e2e`: reference and torch-opt at 1024x1024 and 960x1280, 25 steps, CFG 7.5, 1 character, fp16 and bf16:
   median seconds per image and per UNet step, peak GPU memory (benchmarks.run lines).
3. `kernel`: the fused dual-attention kernel against two SDPA calls at SDXL's shapes (benchmarks.dual_attention).
4. `graph`: torch-opt with and without the CUDA graph (1024^2, fp16).
5. `compile`: torch-opt with and without `--compile` (1024^2, fp16).

Results: JSON lines in DIR (`device_check.jsonl` per stage, `runs.jsonl`, `dual_attention.jsonl`). `--dry-run`
runs nowhere: it prints the plan with its time estimates and checks the wheel folder against the list (every
wheel there, at most 64 MiB in all); the test suite runs it.
"""
from __future__ import annotations

import json
import re
import time
import traceback
from pathlib import Path

from storymaker_serve.benchmarks import CHECKOUT
from storymaker_serve.runtime.cli import argument_parser, configure_logging

WHEELS = CHECKOUT / "requirements" / "device-wheels.txt"
WHEEL_BUDGET = 64 << 20
E2E_SIZES = ((1024, 1024), (960, 1280))                  # (width, height)
# (stage, estimated seconds on a Hopper-class GPU, counted from the e2e runs: model init ~15 s, an image ~3 s)
PLAN = (("parity", 60), ("e2e", 240), ("kernel", 30), ("graph", 45), ("compile", 150))


def wanted_wheels(path: Path = WHEELS) -> dict[str, str]:
    """{distribution: version} of the wheel list (pip requirement lines)."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", path.read_text(), re.M)
    return {re.sub(r"[-_.]+", "_", n).lower(): v for n, v in pins}


def check_wheels(folder: Path, path: Path = WHEELS) -> list[str]:
    """Problems of a wheel folder: a listed wheel missing, or more than 64 MiB in all (what can travel)."""
    want, have, problems = wanted_wheels(path), {}, []
    for w in sorted(Path(folder).glob("*.whl")):
        name, version = w.name.split("-")[:2]
        have[re.sub(r"[-_.]+", "_", name).lower()] = (version, w.stat().st_size)
    for name, version in want.items():
        if have.get(name, (None,))[0] != version:
            problems.append(f"{name}=={version} missing from {folder}")
    total = sum(size for _, size in have.values())
    if total > WHEEL_BUDGET:
        problems.append(f"{folder} holds {total / 2**20:.1f} MiB of wheels, over the {WHEEL_BUDGET >> 20} MiB budget")
    return problems


def _runs(out: Path, *args: str) -> list[dict]:
    from storymaker_serve.benchmarks.run import main as run

    return run(["--weights", "random-full", "--steps", "25", "--guidance", "7.5", "--characters", "1",
                "--repeats", "3", "--warmup", "1", *args, "--out", str(out / "runs.jsonl")])


def stage_parity(out: Path) -> dict:
    """torch-opt (fused LoRA, fp16) against the reference (unfused processors) on the same random weights."""
    import copy

    import numpy as np
    import torch

    from storymaker_serve.export.random_models import random_full_models
    from storymaker_serve.runtime.adapter import fuse_lora
    from storymaker_serve.runtime.characters import CharacterFeatures, clip_features, image_tokens
    from storymaker_serve.runtime.denoise import VAEDecode, decode
    from storymaker_serve.runtime.fast import FastOptions, FastPipeline
    from storymaker_serve.runtime.pipeline import GenerateOptions, StoryMakerPipeline, encode_text

    ref = random_full_models("cuda", torch.float16, fuse=False)
    opt = copy.deepcopy(ref)
    unet = opt.sdxl.unet
    unet.set_attn_processor(fuse_lora(unet, dict(unet.attn_processors), opt.lora_scale))
    g = torch.Generator().manual_seed(0)
    px = ref.image_encoder.config.image_size
    crops = torch.randn(2, 3, px, px, generator=g).cuda()
    feats = clip_features(ref.image_encoder, crops)
    features = CharacterFeatures(torch.randn(1, ref.ppr.cfg.id_dim, generator=g), feats[:1], feats[1:])
    tok_ref, tok_opt = image_tokens(ref.ppr, features), image_tokens(opt.ppr, features)
    opts = GenerateOptions("a man walking in a park", width=1024, height=1024, steps=4, seed=1)
    text = encode_text(ref.sdxl, opts.prompt, None)
    frames = {}
    for name, pipe in (("reference", StoryMakerPipeline(ref)),
                       ("torch-opt", FastPipeline(opt, FastOptions(precision="fp16", fused_qkv=True,
                                                                   channels_last=True)))):
        tokens = tok_ref if name == "reference" else tok_opt
        frames[name] = decode(VAEDecode(pipe.m.sdxl.vae), pipe.latents(opts, text, tokens))
    a, b = (t[0].float().flatten() for t in (tok_ref, tok_opt))
    diff = np.abs(frames["reference"].astype(int) - frames["torch-opt"].astype(int))
    return {"tokens_max_abs": float((a - b).abs().max()), "tokens_cos": float(torch.nn.functional.cosine_similarity(
        a, b, dim=0)), "frame_max_uint8_diff": int(diff.max()), "frame_mean_uint8_diff": float(diff.mean()),
        "size": [1024, 1024], "steps": 4, "precision": "fp16"}


def stage_e2e(out: Path) -> dict:
    lines = []
    for precision in ("fp16", "bf16"):
        for width, height in E2E_SIZES:
            lines += _runs(out, "--backends", "reference,torch-opt", "--precision", precision, "--size", str(height),
                           "--width", str(width), "--channels-last", "--fused-qkv")
    return {"runs": len(lines)}


def stage_kernel(out: Path) -> dict:
    from storymaker_serve.benchmarks.dual_attention import main as kernel

    kernel(["--out", str(out / "dual_attention.jsonl")])
    return {}


def stage_graph(out: Path) -> dict:
    _runs(out, "--backends", "torch-opt", "--precision", "fp16", "--size", "1024", "--channels-last", "--fused-qkv")
    _runs(out, "--backends", "torch-opt", "--precision", "fp16", "--size", "1024", "--channels-last", "--fused-qkv",
          "--cuda-graph")
    return {}


def stage_compile(out: Path) -> dict:
    _runs(out, "--backends", "torch-opt", "--precision", "fp16", "--size", "1024", "--channels-last", "--fused-qkv",
          "--compile")
    return {}


STAGES = {"parity": stage_parity, "e2e": stage_e2e, "kernel": stage_kernel, "graph": stage_graph,
          "compile": stage_compile}


def main(argv=None) -> list[dict]:
    ap = argument_parser("python -m benchmarks.device_check", __doc__)
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON lines")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds the whole check may take")
    ap.add_argument("--stages", default=",".join(name for name, _ in PLAN), help="comma-separated, in order")
    ap.add_argument("--wheels", type=Path, default=CHECKOUT / ".whl", help="the carried wheel folder (dry run)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check the wheels; run nothing")
    a = ap.parse_args(argv)
    configure_logging(a)
    estimates = dict(PLAN)
    names = a.stages.split(",")
    if unknown := [n for n in names if n not in STAGES]:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if a.dry_run:
        spent, fits = 0, []
        for n in names:
            spent += estimates[n]
            if spent <= a.budget:
                fits.append(n)
            print(f"stage {n}: about {estimates[n]} s" + ("" if spent <= a.budget else " (runs only if time is left)"))
        print(f"in all about {spent} s; the {a.budget:.0f} s budget covers {', '.join(fits) or 'no stage'}")
        problems = check_wheels(a.wheels) if a.wheels.exists() else [f"no wheel folder at {a.wheels}"]
        for p in problems:
            print(f"wheels: {p}")
        return [{"dry_run": True, "stages": names, "fit": fits, "estimated_s": spent, "budget_s": a.budget,
                 "wheel_problems": problems}]
    a.out.mkdir(parents=True, exist_ok=True)
    t_start, rows = time.monotonic(), []
    for name in names:
        left = a.budget - (time.monotonic() - t_start)
        row = {"stage": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if left < estimates[name]:
            row.update(ok=None, skipped=f"{left:.0f} s left of the budget, the stage takes about {estimates[name]} s")
        else:
            t0 = time.monotonic()
            print(f"== {name}", flush=True)
            try:
                row.update(ok=True, **STAGES[name](a.out))
            except Exception as e:  # noqa: BLE001 - recorded; the next stage still runs
                row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            row["seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows.append(row)
        with (a.out / "device_check.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
