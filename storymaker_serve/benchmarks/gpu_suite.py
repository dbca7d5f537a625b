"""`python -m benchmarks.gpu_suite`: every GPU figure of the performance goals, in named stages.

Each stage is one command that finishes in a few minutes on one GPU, so a short time on a GPU host covers the
list stage by stage:

- `tests`: the GPU variants of the parity tests (fp16/bf16 torch-opt with every
  optimisation vs the fp32 reference; the fused kernel natively).
- `kernel`: `benchmarks.dual_attention` (fused kernel vs two SDPA calls).
- `e2e`: reference vs torch-opt at 1024^2, 25 steps, 1 character, CFG 7.5,
  random-full weights, adding one optimisation per run (the ladder below), so
  each flag's effect is its own JSON line; per-stage breakdown, counted FLOPs,
  % of fp16 peak, peak GPU memory.
- `compile`: torch-opt with `--compile` (max-autotune), alone and inside the
  CUDA graph.
- `sizes`: the best eager ladder rung at 768/1024/1280 px and 1/2 characters
  (the latency-vs-resolution and vs-characters charts).

Results go to `--results DIR` (default benchmarks/results) as the usual JSON lines plus one `suite.jsonl` line
per stage (exit code, seconds). A stage that fails is recorded and the next one runs. `--tiny` runs the same
plumbing on the demo bundle at 64 px and 2 steps with the CUDA-only flags dropped when there is no GPU (how the
CPU test checks it). On a GPU host without network, docs/performance.md ("Device check") says which wheels to
bring.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from storymaker_serve.benchmarks import CHECKOUT, RESULTS
from storymaker_serve.benchmarks.dual_attention import main as kernel
from storymaker_serve.benchmarks.run import main as run
from storymaker_serve.runtime.cli import argument_parser

LADDER = [                       # cumulative: each rung adds one optimisation to the one before
    ["--channels-last"],
    ["--channels-last", "--fused-qkv"],
    ["--channels-last", "--fused-qkv", "--dual-attention-kernel"],
    ["--channels-last", "--fused-qkv", "--dual-attention-kernel", "--cuda-graph"],
]
CUDA_ONLY = {"--dual-attention-kernel", "--cuda-graph"}


def _base(a, size: int | None = None, characters: int = 1) -> list[str]:
    if a.tiny:
        run = ["--weights", "demo", "--size", str(size or 64), "--steps", "2", "--repeats", "1", "--warmup", "1"]
    else:
        run = ["--weights", "random-full", "--size", str(size or 1024), "--steps", "25", "--guidance", "7.5",
               "--repeats", "5", "--warmup", "2"]
    return run + ["--characters", str(characters)]


def _flags(flags: list[str]) -> list[str]:
    return flags if torch.cuda.is_available() else [f for f in flags if f not in CUDA_ONLY]


def _run(a, *args: str) -> None:
    run([*args, "--out", str(a.results / "runs.jsonl")])


def stage_tests(a) -> None:
    files = ["tests/test_fast.py", "tests/test_dual_attention.py"]
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *files], cwd=CHECKOUT).returncode
    if rc:
        raise RuntimeError(f"pytest exited {rc}")


def stage_kernel(a) -> None:
    kernel(["--out", str(a.results / "dual_attention.jsonl")])


def stage_e2e(a) -> None:
    _run(a, *_base(a), "--backends", "reference,torch-opt")
    for rung in LADDER:
        _run(a, *_base(a), "--backends", "torch-opt", *_flags(rung))


def stage_compile(a) -> None:
    best = LADDER[2]
    _run(a, *_base(a), "--backends", "torch-opt", *_flags(best), "--compile")
    _run(a, *_base(a), "--backends", "torch-opt", *_flags(best + ["--cuda-graph"]), "--compile")


def stage_sizes(a) -> None:
    for chars in (1, 2):
        for size in (64, 96) if a.tiny else (768, 1024, 1280):
            _run(a, *_base(a, size, chars), "--backends", "torch-opt", *_flags(LADDER[-1]))


STAGES = {"tests": stage_tests, "kernel": stage_kernel, "e2e": stage_e2e, "compile": stage_compile,
          "sizes": stage_sizes}


def main(argv=None) -> list[dict]:
    ap = argument_parser("python -m benchmarks.gpu_suite", __doc__)
    ap.add_argument("--stages", default="tests,kernel,e2e", help=f"comma-separated, from {', '.join(STAGES)}")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="demo bundle, 64 px, 2 steps: checks the plumbing anywhere")
    a = ap.parse_args(argv)
    names = a.stages.split(",")
    if unknown := [n for n in names if n not in STAGES]:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if not torch.cuda.is_available() and not a.tiny:
        print("no CUDA GPU here: figures from this run are CPU figures (use --tiny to check the plumbing)", flush=True)
    a.results.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        print(f"== stage {name}", flush=True)
        t0, error = time.perf_counter(), None
        try:
            STAGES[name](a)
        except (Exception, SystemExit) as e:   # noqa: BLE001 -- record it and go on to the next stage
            error = f"{type(e).__name__}: {e}"
            print(f"== stage {name} failed: {error}", flush=True)
        row = {"stage": name, "ok": error is None, "error": error, "seconds": time.perf_counter() - t0,
               "tiny": a.tiny, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        rows.append(row)
        with (a.results / "suite.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    raise SystemExit(0 if all(r["ok"] for r in main()) else 1)
