"""`python -m benchmarks.plot`: PNG charts from benchmarks/results/runs.jsonl (written by benchmarks.run).

Charts (latest line per configuration and device; one file each under
benchmarks/results/): `latency_by_backend.png` (median and p90 seconds/image per
backend, with the per-stage split where recorded), `speedup.png` (each backend's
speed relative to `reference` at the same settings), `latency_vs_concurrency.png`
(triton: p50 latency and requests/s by client concurrency),
`latency_vs_resolution.png` and `latency_vs_characters.png` when the results hold
more than one size or character count.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from storymaker_serve.benchmarks import RESULTS
from storymaker_serve.runtime.cli import argument_parser

FLAGS = {"channels_last": "cl", "fused_qkv": "qkv", "dual_attention_kernel": "kernel", "offload_encoders": "offload",
         "cuda_graph": "graph", "compile": "compile"}    # torch-opt flags, short names for the chart labels


def load(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict = {}
    for r in lines:                              # later lines win: the newest run of each configuration
        key = (r["backend"], r["device_name"], r["weights"], r["size"], r["steps"], r["characters"],
               r.get("concurrency"),
               # older lines lack new flags
               r["precision"], r.get("vae_precision") or "fp32", *(bool(r.get(k)) for k in FLAGS))
        latest[key] = r
    return list(latest.values())


def _label(r: dict) -> str:
    opts = [short for k, short in FLAGS.items() if r.get(k)]
    concurrency = f" c={r['concurrency']}" if r.get("concurrency") else ""
    return r["backend"] + concurrency + ("\n+" + "+".join(opts) if opts else "")


def bars(rows: list[dict], out: Path) -> list[Path]:
    written = []
    rows = [r for r in rows if r.get("concurrency") in (None, 1)]
    if not rows:
        return written
    ref = {(r["device_name"], r["size"], r["steps"],
            r["characters"]): r["median_s"] for r in rows if r["backend"] == "reference"}
    fig, ax = plt.subplots(figsize=(max(8.0, 1.7 * len(rows)), 4.5))
    labels = [f"{_label(r)}\n{r['device_name'][:18]} {r['size']}px" for r in rows]
    stages = sorted({s for r in rows for s in r.get("stages_median_s", {})})
    bottom = [0.0] * len(rows)
    for s in stages:
        vals = [r.get("stages_median_s", {}).get(s, 0.0) for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=s)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(labels, [r["median_s"] for r in rows], color="black", zorder=3, label="median total")
    ax.scatter(labels, [r["p90_s"] for r in rows], color="red", marker="_", s=300, zorder=3, label="p90")
    ax.set_ylabel("seconds / image")
    ax.set_title(f"StoryMaker end-to-end latency ({rows[0]['steps']} steps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "latency_by_backend.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    sp = [(f"{_label(r)} {r['size']}px", ref[k] / r["median_s"]) for r in rows
          if (k := (r["device_name"], r["size"], r["steps"], r["characters"])) in ref]
    if sp:
        fig, ax = plt.subplots(figsize=(max(7.0, 1.7 * len(sp)), 4))
        ax.bar([s[0] for s in sp], [s[1] for s in sp])
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("speed-up vs reference (x)")
        fig.tight_layout()
        written.append(out / "speedup.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def curve(rows: list[dict], x: str, out: Path, name: str, filt=lambda r: True) -> list[Path]:
    pts = [r for r in rows if filt(r) and r.get(x) is not None]
    if len({r[x] for r in pts}) < 2:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for b in sorted({_label(r).split(" c=")[0] for r in pts}):
        sel = sorted((r for r in pts if _label(r).split(" c=")[0] == b), key=lambda r: r[x])
        ax.plot([r[x] for r in sel], [r["median_s"] for r in sel], marker="o", label=b)
    if x == "concurrency":
        ax2 = ax.twinx()
        sel = sorted(pts, key=lambda r: r[x])
        ax2.plot([r[x] for r in sel], [r["req_per_s"] for r in sel], color="gray", ls="--", marker="x", label="req/s")
        ax2.set_ylabel("requests / s")
    ax.set_xlabel(x)
    ax.set_ylabel("median seconds / image")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None) -> list[Path]:
    ap = argument_parser("python -m benchmarks.plot", __doc__)
    ap.add_argument("--results", type=Path, default=RESULTS / "runs.jsonl")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    rows = load(a.results)
    a.out.mkdir(parents=True, exist_ok=True)
    written = bars(rows, a.out)
    written += curve(rows, "concurrency", a.out, "latency_vs_concurrency.png", lambda r: r["backend"] == "triton")
    written += curve(rows, "size", a.out, "latency_vs_resolution.png", lambda r: r.get("concurrency") in (None, 1))
    written += curve(rows, "characters", a.out, "latency_vs_characters.png",
                     lambda r: r.get("concurrency") in (None, 1))
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
