"""One UNet step, onnxruntime fp32 vs PyTorch (eager, fused projections, compiled) on a mid-size StoryMaker UNet.

`python -m benchmarks.unet_step` builds an SDXL-structured UNet between the
demo bundle and the real model (blocks 160/320/640, transformer layers 1/2/4,
cross_attention_dim 1024, StoryMaker's fused decoupled attention; seeded random
weights), exports it with the build's exporter and spec, then times one CFG
step (batch 2, 48x48 latent = 384 px, 77 + 40 tokens) in onnxruntime and in
PyTorch eager; `--torch-variants` adds torch-opt's `fused_qkv` and
`compile` (torch.compile max-autotune; on a CPU through inductor's C++
backend), each timed on the same inputs. Explicit warm-up, then repeated runs,
median and p90. Outputs are checked to agree (max abs) before timing. One JSON
line goes to benchmarks/results/unet_step.jsonl.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from storymaker_serve.benchmarks import RESULTS
from storymaker_serve.export.components import ExportProfile, UNetGraph, build_specs, models_view
from storymaker_serve.export.onnx_export import export_onnx
from storymaker_serve.export.parity import session
from storymaker_serve.runtime.adapter import build_processors
from storymaker_serve.runtime.attention import use_fused_projections
from storymaker_serve.runtime.cli import argument_parser

MID_UNET = dict(sample_size=48, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(160, 320, 640),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 4), attention_head_dim=(5, 5, 10), cross_attention_dim=1024,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=128,
                projection_class_embeddings_input_dim=6 * 128 + 512)


def _time(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _torch_variants(graph, unet, args, ref, a) -> dict:
    """fused_qkv, then fused_qkv + torch.compile(max-autotune): median/p90 seconds, compile time, max abs vs eager."""
    out: dict = {}
    use_fused_projections(unet)
    with torch.no_grad():
        out["fused_qkv_max_abs_err"] = float((graph(*args).numpy() - ref).__abs__().max())
        t = _time(lambda: graph(*args), a.warmup, a.repeats)
        out["fused_qkv_median_s"], out["fused_qkv_p90_s"] = float(np.median(t)), float(np.percentile(t, 90))
        compiled = torch.compile(graph, mode="max-autotune")
        t0 = time.perf_counter()
        out["compile_max_abs_err"] = float((compiled(*args).numpy() - ref).__abs__().max())
        out["compile_first_call_s"] = time.perf_counter() - t0
        t = _time(lambda: compiled(*args), a.warmup, a.repeats)
        out["compile_median_s"], out["compile_p90_s"] = float(np.median(t)), float(np.percentile(t, 90))
    return out


def main(argv=None) -> dict:
    ap = argument_parser("python -m benchmarks.unet_step", __doc__)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-variants", action="store_true", help="also time fused_qkv and torch.compile")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MID_UNET).eval()
    unet.set_attn_processor(build_processors(unet, rank=0, lora_scale=1.0, ip_scale=0.8))
    m = models_view(unet, text_widths=(512, 512), cross_attention_dim=1024, vocab=10)
    spec = build_specs(m, ExportProfile(min_size=128, opt_size=384, max_size=512))["unet"]
    values = {"N": 2, "h": 48, "w": 48, "S": 117}
    feeds = spec.sample_inputs(values, seed=0)
    for k in feeds:
        if k.startswith(("down_res", "mid_res")):
            feeds[k] = np.zeros_like(feeds[k])
    params = sum(p.numel() for p in unet.parameters())          # before fused projections alias the weights
    graph = UNetGraph(unet).eval()
    args = [torch.from_numpy(v) for v in feeds.values()]
    with tempfile.TemporaryDirectory() as tmp:
        info = export_onnx(graph, spec, Path(tmp) / "unet.onnx")
        sess = session(info["files"][0])
        with torch.no_grad():
            ref = graph(*args).numpy()
            err = float(np.abs(sess.run(["noise_pred"], feeds)[0] - ref).max())
            t_torch = _time(lambda: graph(*args), a.warmup, a.repeats)
        t_ort = _time(lambda: sess.run(["noise_pred"], feeds), a.warmup, a.repeats)
        variants = _torch_variants(graph, unet, args, ref, a) if a.torch_variants else {}
    med = lambda xs: float(np.median(xs))
    row = {"bench": "unet_step", "config": "mid (160/320/640, D 1024)", "params": params,
           "latent": [2, 4, 48, 48], "tokens": 117, "max_abs_err": err, "torch_eager_median_s": med(t_torch),
           "torch_eager_p90_s": float(np.percentile(t_torch, 90)), "ort_median_s": med(t_ort),
           "ort_p90_s": float(np.percentile(t_ort, 90)), "ort_speedup": med(t_torch) / med(t_ort), **variants,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = RESULTS / "unet_step.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
