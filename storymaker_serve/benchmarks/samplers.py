"""`python -m benchmarks.samplers`: UNet evaluations and seconds per image for the sampler settings that matter.

Runs a build's engines in process (onnxruntime, runtime.serving.logic.EnginePipeline) on one character and one
prompt, and for each setting counts the UNet rows evaluated (one row = one latent through the UNet; CFG runs two
per step) and times whole images (text, loop, decode; characters encoded once):

- 25-step UniPC with CFG 7.5 (the release's setting),
- 8-step DPM++ 2M Karras with CFG 7.5,
- 4-step Euler, trailing spacing, guidance 1 (no CFG batch): what a fused few-step LoRA (SDXL-Lightning) runs.

A fused LoRA changes weights, not the graph, so the third setting costs the same with or without one; what a
distillation LoRA does to the pictures with StoryMaker's image layers cannot be judged on random weights.
Appends JSON lines to `--out` and prints a table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from storymaker_serve.benchmarks import RESULTS
from storymaker_serve.examples import DATA
from storymaker_serve.runtime.cli import argument_parser, configure_logging
from storymaker_serve.runtime.pipeline import GenerateOptions
from storymaker_serve.runtime.serving.engines import Build
from storymaker_serve.runtime.serving.logic import EnginePipeline
from storymaker_serve.runtime.serving.request import CharacterRequest

SETTINGS = (("unipc 25 steps, CFG 7.5", dict(scheduler="unipc", steps=25, guidance=7.5)),
            ("dpmpp-2m-karras 8 steps, CFG 7.5", dict(scheduler="dpmpp-2m-karras", steps=8, guidance=7.5)),
            ("euler trailing 4 steps, guidance 1", dict(scheduler="euler", timestep_spacing="trailing", steps=4,
                                                        guidance=1.0)))


def _count_rows(pipeline: EnginePipeline) -> list[int]:
    """Wrap the pipeline's UNet function so each call adds its rows to the returned counter."""
    rows, unet = [0], pipeline.denoiser.unet_fn

    def counted(feeds):
        rows[0] += int(feeds["sample"].shape[0])
        return unet(feeds)

    pipeline.denoiser.unet_fn = counted
    return rows


def main(argv=None) -> list[dict]:
    ap = argument_parser("python -m benchmarks.samplers", __doc__)
    ap.add_argument("--build", type=Path, default=Path("build/demo"), help="a build folder (manifest.json)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=2, help="timed images per setting")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed images per setting first; 0: one 1-step image before all settings instead (sessions "
                         "and buffers), for the released sizes where a warm-up image costs minutes")
    ap.add_argument("--out", type=Path, default=RESULTS / "samplers.jsonl")
    a = ap.parse_args(argv)
    configure_logging(a)
    build = Build(a.build)
    pipeline = EnginePipeline(build)
    rows = _count_rows(pipeline)
    chars = CharacterRequest([(DATA / "ldh.png").read_bytes()], [(DATA / "ldh_mask.png").read_bytes()], [None],
                             [(DATA / "ldh.face.json").read_text()], [0])
    tokens = pipeline.encode_characters(chars)
    records = []
    if a.warmup == 0:
        pipeline.generate(GenerateOptions("warm-up", width=a.size, height=a.size, seed=1, steps=1), tokens)
    for label, setting in SETTINGS:
        opts = GenerateOptions("a man walking in a park", width=a.size, height=a.size, seed=1, **setting)
        for _ in range(a.warmup):
            pipeline.generate(opts, tokens)                              # warm-up: sessions, plans
        rows[0], times = 0, []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            pipeline.generate(opts, tokens)
            times.append(time.perf_counter() - t0)
        rec = {"setting": label, **setting, "size": a.size, "build": str(a.build), "warmup": a.warmup,
               "precision": build.data.get("precision"), "unet_rows_per_image": rows[0] // a.repeats,
               "seconds_per_image": round(float(np.median(times)), 3), "runs_s": [round(t, 3) for t in times],
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        records.append(rec)
        print(f"{label}: {rec['unet_rows_per_image']} UNet rows, {rec['seconds_per_image']} s per image", flush=True)
    base = records[0]
    for r in records:
        r["rows_vs_unipc"] = round(r["unet_rows_per_image"] / base["unet_rows_per_image"], 3)
        r["time_vs_unipc"] = round(r["seconds_per_image"] / base["seconds_per_image"], 3)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


if __name__ == "__main__":
    main()
