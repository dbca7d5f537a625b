"""GPU benchmark: fused dual-stream attention kernel vs two `scaled_dot_product_attention` calls.

`python -m benchmarks.dual_attention` (CUDA only) times both at SDXL's
cross-attention shapes at 1024^2 (batch 2 = one CFG pair; query lengths 4096
and 1024 with 10 and 20 heads; head dim 64; 77 text + 40/60/80 image tokens),
fp16, in one run, with explicit warm-up and triton's `do_bench` (median of
repeated launches), and appends one JSON line per shape to
`benchmarks/results/dual_attention.jsonl` with the ratio, device and versions.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

SHAPES = [(2, 10, 4096, 64), (2, 20, 1024, 64)]   # (B, heads, M, d) of SDXL's two attention levels at 1024^2


def main(argv=None) -> None:
    import argparse

    import triton
    from triton.testing import do_bench

    from kernels.dual_attention import dual_attention, dual_attention_reference

    ap = argparse.ArgumentParser(prog="python -m benchmarks.dual_attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dual_attention.jsonl")
    out = ap.parse_args(argv).out
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (no figure is produced on a CPU)")
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for b, h, m, d in SHAPES:
        for n_img in (40, 60, 80):
            r = lambda n: torch.randn(b, h, n, d, device="cuda", dtype=torch.float16)
            q, kt, vt, ki, vi = r(m), r(77), r(77), r(n_img), r(n_img)
            err = (dual_attention(q, kt, vt, ki, vi, 0.8).float()
                   - dual_attention_reference(q, kt, vt, ki, vi, 0.8).float()).abs().max().item()
            t_ref = do_bench(lambda: dual_attention_reference(q, kt, vt, ki, vi, 0.8), warmup=50, rep=300)
            t_ker = do_bench(lambda: dual_attention(q, kt, vt, ki, vi, 0.8), warmup=50, rep=300)
            row = {"shape": [b, h, m, d], "n_text": 77, "n_img": n_img, "dtype": "fp16", "sdpa_x2_ms": t_ref,
                   "kernel_ms": t_ker, "speedup": t_ref / t_ker, "max_abs_err": err,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
