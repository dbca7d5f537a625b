"""Scale check (not part of CI): export the FULL-size SDXL UNet + StoryMaker IP layers to ONNX.

Builds the SDXL base UNet (2.6 B params) with seeded random weights, installs
the fused StoryMaker processors (to_k_ip/to_v_ip per cross-attention, 70 of
them), exports it with the same `export_onnx` path and spec as the real build
(external data > 2 GB), and reports wall time, peak host memory (ru_maxrss)
and file sizes. The export runs at the profile's minimum latent size to bound
tracing memory; the graph's axes stay dynamic. Run:

    .venv/bin/python -m export.scale_check --out build/scale_check
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from storymaker_serve.export.components import ExportProfile, UNetGraph, build_specs, models_view
from storymaker_serve.export.onnx_export import export_onnx
from storymaker_serve.export.sdxl_config import SDXL_UNET
from storymaker_serve.runtime.adapter import build_processors
from storymaker_serve.runtime.cli import argument_parser


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None) -> None:
    ap = argument_parser("python -m export.scale_check", __doc__)
    ap.add_argument("--out", type=Path, default=Path("build/scale_check"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SDXL_UNET).eval()
    procs = build_processors(unet, rank=0, lora_scale=1.0, ip_scale=0.8)   # fused: IP layers only
    unet.set_attn_processor(procs)
    n_params = sum(p.numel() for p in unet.parameters())
    t_build = time.perf_counter() - t0
    print(f"built full-size UNet + IP layers: {n_params / 1e9:.3f} B params in {t_build:.1f} s, "
          f"peak RSS {peak_rss_gb():.1f} GB", flush=True)

    m = models_view(unet, text_widths=(768, 1280), cross_attention_dim=2048)   # the released SDXL/StoryMaker dims
    prof = ExportProfile(min_size=512, opt_size=512, max_size=1536)
    spec = build_specs(m, prof)["unet"]
    t1 = time.perf_counter()
    info = export_onnx(UNetGraph(unet), spec, a.out / "unet" / "model.onnx")
    t_export = time.perf_counter() - t1
    sizes = {str(f): f.stat().st_size for f in info["files"]}
    report = {"params": n_params, "build_seconds": round(t_build, 1), "export_seconds": round(t_export, 1),
              "peak_rss_gb": round(peak_rss_gb(), 2), "files": sizes, "total_gb": round(sum(sizes.values()) / 1e9, 2),
              "export_latent": spec.assignment("opt"), "slimmed": info["slimmed"], "exporter": info["exporter"]}
    (a.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
