"""GPU benchmark: fused dual-stream attention kernel vs two `scaled_dot_product_attention` calls.

`python -m benchmarks.dual_attention` (CUDA only) times both at SDXL's
cross-attention shapes at 1024^2 (batch 2 = one CFG pair; query lengths 4096
and 1024 with 10 and 20 heads; head dim 64; 77 text + 40/60/80 image tokens),
fp16, in one run, with explicit warm-up and triton's `do_bench` (asked for the
median of repeated launches; its default is the mean), `ip_scale` a device tensor, and appends one JSON line per shape
to
`benchmarks/results/dual_attention.jsonl` with the ratio, device and versions.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from storymaker_serve.benchmarks import RESULTS
from storymaker_serve.runtime.cli import argument_parser

SHAPES = [(2, 10, 4096, 64), (2, 20, 1024, 64)]   # (B, heads, M, d) of SDXL's two attention levels at 1024^2


def inputs(b: int, h: int, m: int, d: int, n_img: int, device, dtype=torch.float16, seed: int = 0) -> dict:
    """One shape's tensors, all on `device`, ip_scale included: a Python float would make the wrapper build a
    host tensor and copy it to the device on every call (a blocking copy inside the timed region)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(b, h, n, d, generator=g).to(device, dtype)
    return {"q": r(m), "k_t": r(77), "v_t": r(77), "k_ip": r(n_img), "v_ip": r(n_img),
            "ip_scale": torch.full((b,), 0.8, device=device, dtype=torch.float32)}


def measure(shapes, device, bench, n_imgs=(40, 60, 80), dtype=torch.float16) -> list[dict]:
    """Time the kernel and two SDPA calls per shape with `bench(fn)` (median milliseconds); rows without
    environment fields. Runs anywhere (the CPU through Triton's interpreter in tests)."""
    from storymaker_serve.kernels.dual_attention import dual_attention, dual_attention_reference

    rows = []
    for b, h, m, d in shapes:
        for n_img in n_imgs:
            x = inputs(b, h, m, d, n_img, device, dtype)
            err = (dual_attention(**x).float() - dual_attention_reference(**x).float()).abs().max().item()
            t_ref = bench(lambda x=x: dual_attention_reference(**x))
            t_ker = bench(lambda x=x: dual_attention(**x))
            rows.append({"shape": [b, h, m, d], "n_text": 77, "n_img": n_img, "dtype": str(dtype).split(".")[-1],
                         "sdpa_x2_ms": t_ref, "kernel_ms": t_ker, "speedup": t_ref / t_ker, "max_abs_err": err,
                         "timing": "median"})
    return rows


def median_ms(fn) -> float:
    """triton.testing.do_bench returns the mean unless asked: ask for the median."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def main(argv=None) -> None:

    import triton

    ap = argument_parser("python -m benchmarks.dual_attention", __doc__)
    ap.add_argument("--out", type=Path, default=RESULTS / "dual_attention.jsonl")
    out = ap.parse_args(argv).out
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (no figure is produced on a CPU)")
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": commit}
    for row in measure(SHAPES, "cuda", median_ms):
        row = {**row, **env, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
