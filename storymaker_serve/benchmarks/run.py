"""`python -m benchmarks.run`: end-to-end latency of StoryMaker backends side by side, one JSON line per run.

Backends: `reference` (the release's semantics: unfused LoRA processors, eager;
fp16 on a GPU), `torch-opt` (runtime/fast.py, one positive flag per
optimisation), `onnxruntime` (the build's ONNX engines in-process, the served
logic without a server), `triton` (a real tritonserver on loopback, sweeping
client concurrency). Weights: `demo` (the tiny bundle, exported on first use),
`random-full` (released sizes, random weights, for timing on a GPU) or a
weights folder. Each backend gets explicit warm-up runs, then `--repeats`
timed runs; medians and p90 of end-to-end seconds plus a per-stage breakdown
(character encoders, resampler, text encoders, denoise, VAE; the served
backends time encoders + resampler as one stage), counted FLOPs per stage
(benchmarks/flops.py), achieved TFLOP/s and, on a GPU whose peak is known, %
of its dense fp16 peak. Every line
carries all flags, device, torch/CUDA/driver versions, git commit, peak GPU
memory (torch.cuda.max_memory_allocated) and peak host RSS; triton lines also
the server's steady-state host memory. `--quick` is the CPU smoke setting
(demo, 128 px, 8 steps, all backends, concurrency 1/2/4; a few minutes).
"""
from __future__ import annotations

import gc
import json
import platform
import resource
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from storymaker_serve.benchmarks import CHECKOUT, RESULTS, TEST_DATA
from storymaker_serve.benchmarks.flops import achieved, image_flops
from storymaker_serve.benchmarks.plot import main as plot
from storymaker_serve.benchmarks.processes import tree_rss_kib
from storymaker_serve.runtime.characters import (
    Character,
    CharacterFeatures,
    character_features,
    clip_features,
    image_tokens,
)
from storymaker_serve.runtime.cli import argument_parser
from storymaker_serve.runtime.denoise import VAEDecode, decode, engine_vae01
from storymaker_serve.runtime.fast import DTYPES, FastOptions, FastPipeline
from storymaker_serve.runtime.loaders import load_storymaker
from storymaker_serve.runtime.pipeline import GenerateOptions, StoryMakerPipeline, encode_text
from storymaker_serve.runtime.serving.engines import Build
from storymaker_serve.runtime.serving.logic import EnginePipeline, generate_latents
from storymaker_serve.runtime.serving.request import CharacterRequest
from storymaker_serve.runtime.weights import WeightsLayout

DATA = TEST_DATA
CHARS = [("ldh.png", "ldh_mask.png", "ldh.face.json"), ("tsy.png", "tsy_mask.png", "tsy.face.json")]


def parse_args(argv=None):
    ap = argument_parser("python -m benchmarks.run", __doc__)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: demo weights, 128 px, 8 steps, all backends")
    ap.add_argument("--backends", default="reference,torch-opt")
    ap.add_argument("--weights", default="demo", help="demo | random-full | a weights folder")
    ap.add_argument("--build", type=Path,
                    help="ONNX build folder for onnxruntime/triton (default: build/bench_<weights>)")
    ap.add_argument("--size", type=int, default=1024, help="image height (and width unless --width) in pixels")
    ap.add_argument("--width", type=int, help="image width in pixels (default: --size)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--characters", type=int, default=1, choices=(1, 2))
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: fp16 on GPU, fp32 on CPU")
    ap.add_argument("--dual-attention-kernel", action="store_true",
                    help="torch-opt: the fused Triton kernel for every decoupled cross-attention (CUDA)")
    ap.add_argument("--channels-last", action="store_true", help="torch-opt: UNet/VAE in channels_last memory format")
    ap.add_argument("--fused-qkv", action="store_true", help="torch-opt: one GEMM for Q|K|V (self) and K|V (cross)")
    ap.add_argument("--offload-encoders", action="store_true",
                    help="torch-opt: CLIP vision + resampler on the host between character encodings")
    ap.add_argument("--vae-precision", choices=("fp32", "bf16"), default="fp32",
                    help="torch-opt VAE precision (fp16 overflows in SDXL's VAE)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="torch-opt: capture the UNet step as a CUDA graph per shape")
    ap.add_argument("--compile", action="store_true", help="torch-opt: torch.compile the UNet (max-autotune)")
    ap.add_argument("--concurrency", default="1,2,4", help="triton backend: client concurrency levels")
    ap.add_argument("--out", type=Path, default=RESULTS / "runs.jsonl")
    a = ap.parse_args(argv)
    if a.quick:
        a.weights, a.size, a.steps, a.repeats, a.warmup = "demo", 128, 8, 3, 1
        a.backends = "reference,torch-opt,onnxruntime,triton"
    a.precision = a.precision or ("fp16" if a.device == "cuda" else "fp32")
    return a


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=CHECKOUT, capture_output=True,
                            text=True).stdout.strip()
    env = {"host": platform.node(), "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "git_commit": commit, "device_name": "cpu", "driver": None}
    if torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True)
        env["driver"] = smi.stdout.strip() or None
    return env


def _stats(xs: list[float]) -> dict:
    return {"median_s": float(np.median(xs)), "p90_s": float(np.percentile(xs, 90)),
            "runs_s": [round(x, 4) for x in xs]}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_weights(weights: str, device: str = "cpu", precision: str = "fp32", fuse: bool = True):
    """StoryMakerModels for `demo` (the bundle, written on first use), `random-full` or a weights folder."""
    if weights == "random-full":
        from storymaker_serve.export.random_models import random_full_models

        return random_full_models(device, DTYPES[precision], fuse=fuse)
    if weights == "demo":
        from storymaker_serve.export.demo_bundle import write_demo_bundle

        wdir = write_demo_bundle(CHECKOUT / "build/bench_demo/demo_bundle")
    else:
        wdir = Path(weights)

    return load_storymaker(WeightsLayout.from_dir(wdir), fuse=fuse, device=device)


def _characters(n):
    return [Character.load(DATA / p, DATA / m, DATA / f) for p, m, f in CHARS[:n]]


def _opts(a, seed=0):
    return GenerateOptions("a man walking in a park, cinematic", negative_prompt="blurry", steps=a.steps,
                           guidance=a.guidance, width=a.width or a.size, height=a.size, seed=seed)


def _summary(totals: list[float], stages: list[dict]) -> dict:
    """Median/p90 of whole images, per-stage medians, and the median frame of a story (characters encoded once)."""
    frame = [sum(v for k, v in st.items() if k in ("text", "denoise", "vae")) for st in stages]
    return {**_stats(totals), "stages_median_s": {k: float(np.median([s[k] for s in stages])) for k in stages[0]},
            "frame_median_s": float(np.median(frame))}


_FLOPS: dict = {}


def _flops_key(a) -> tuple:
    return a.weights, a.size, a.width, a.characters, a.steps


def _image_flops(a, models) -> dict | None:
    """Counted FLOPs per stage (benchmarks/flops.py); None if counting fails (it never blocks a timing run)."""
    try:
        return image_flops(models, a.size, a.characters, a.steps, width=a.width)
    except Exception as e:    # noqa: BLE001 -- a model class FlopCounterMode cannot rebuild on meta
        print(f"(FLOP count skipped: {type(e).__name__}: {e})", flush=True)
        return None


def _encode_characters(a, models, chars, st: dict, pipe=None):
    """Character tokens, timing `encoders` (face models + CLIP vision, and any offload transfers) and `ppr` into st."""
    t0 = time.perf_counter()
    with pipe.encoders_on_device() if hasattr(pipe, "encoders_on_device") else nullcontext():
        tokens = _timed_encode(a, models, chars, st)
    _sync()
    st["encoders"] = time.perf_counter() - t0 - st["ppr"]
    return tokens


def _timed_encode(a, models, chars, st: dict):
    if chars is not None:
        f = character_features(models, chars)
    else:   # random-full: CLIP-H on two 224^2 crops per character (no buffalo_l models: random ArcFace ids)
        n, enc = a.characters, models.image_encoder
        px = enc.config.image_size
        feats = clip_features(enc, torch.randn(2 * n, 3, px, px, device=a.device))
        f = CharacterFeatures(torch.randn(n, models.ppr.cfg.id_dim), feats[:n], feats[n:])
    _sync()
    t1 = time.perf_counter()
    tokens = image_tokens(models.ppr, f)
    _sync()
    st["ppr"] = time.perf_counter() - t1            # `encoders` is the rest of the caller's span
    return tokens


def bench_torch(a, backend: str) -> dict:
    models = load_weights(a.weights, a.device, a.precision, fuse=backend != "reference")
    if _flops_key(a) not in _FLOPS:                  # counted once per configuration, not once per backend
        _FLOPS[_flops_key(a)] = _image_flops(a, models)
    if backend == "reference":     # the release: eager, unfused LoRA processors, everything but the VAE in a.precision
        for mod in (models.sdxl.unet, models.sdxl.text_encoder, models.sdxl.text_encoder_2, models.ppr,
                    models.image_encoder):
            mod.to(a.device, DTYPES[a.precision])
        pipe = StoryMakerPipeline(models)
    else:
        pipe = FastPipeline(models, FastOptions(precision=a.precision, vae_precision=a.vae_precision,
                                                dual_attention_kernel=a.dual_attention_kernel,
                                                channels_last=a.channels_last, fused_qkv=a.fused_qkv,
                                                offload_encoders=a.offload_encoders,
                                                cuda_graph=a.cuda_graph, compile=a.compile))
    chars = _characters(a.characters) if a.weights != "random-full" else None
    totals, stages = [], []
    for r in range(a.warmup + a.repeats):
        st: dict = {}
        t0 = time.perf_counter()
        tokens = _encode_characters(a, models, chars, st, pipe)
        opts = _opts(a, r)
        t1 = time.perf_counter()
        text = encode_text(models.sdxl, opts.prompt, opts.negative_prompt)
        _sync()
        st["text"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        lat = pipe.latents(opts, text, tokens)
        _sync()
        st["denoise"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        decode(VAEDecode(models.sdxl.vae), lat)
        _sync()
        st["vae"] = time.perf_counter() - t3
        if r >= a.warmup:
            totals.append(time.perf_counter() - t0)
            stages.append(st)
    # what the cross-attention really ran: "fused", "fallback: <why>" (e.g. no interpreter on a CPU), or off
    kernel = getattr(pipe, "kernel", None)
    return {**_summary(totals, stages), "dual_attention_kernel_ran": kernel}


def _build(a) -> Path:
    from storymaker_serve.export.build import main as build_main  # the exporter: only for a build
    out = a.build or CHECKOUT / f"build/bench_{a.weights if a.weights in ('demo', 'random-full') else 'weights'}"
    args = ["--demo"] if a.weights == "demo" else ["--weights", a.weights]
    if build_main(args + ["--out", str(out)]) != 0:
        raise SystemExit(f"export.build failed for {out}")
    return out


def bench_onnxruntime(a) -> dict:
    """The build's engines in process (runtime.serving.logic.EnginePipeline), stage by stage."""
    b = Build(_build(a))
    ep = EnginePipeline(b)
    req = CharacterRequest(*[[(DATA / c[k]).read_bytes() for c in CHARS[:a.characters]] for k in (0, 1)],
                           [None] * a.characters, [(DATA / c[2]).read_text() for c in CHARS[:a.characters]],
                           [0] * a.characters)
    totals, stages = [], []
    for r in range(a.warmup + a.repeats):
        st, t0 = {}, time.perf_counter()
        tokens = ep.encode_characters(req)
        st["encoders+ppr"] = time.perf_counter() - t0
        opts = _opts(a, r)
        t1 = time.perf_counter()
        text, _ = ep.text(opts.prompt, opts.negative_prompt)
        st["text"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        lat = generate_latents(opts, text, tokens, ep.denoiser, b, ep.plans)
        st["denoise"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        decode(engine_vae01(ep.vae), lat)
        st["vae"] = time.perf_counter() - t3
        if r >= a.warmup:
            totals.append(time.perf_counter() - t0)
            stages.append(st)
    return _summary(totals, stages)


def bench_triton(a) -> list[dict]:
    # imported here: the triton backend alone needs tritonclient and a tritonserver (the GPU device check has neither)
    import tritonclient.grpc as grpcclient

    from storymaker_serve.benchmarks.load import run_level
    from storymaker_serve.runtime.serving.client import StoryMakerClient
    from storymaker_serve.runtime.serving.launcher import TritonServer

    rows = []
    with TritonServer(_build(a) / "triton_repo") as srv:
        client, admin = StoryMakerClient(srv.url), grpcclient.InferenceServerClient(srv.url)
        chars = [{"photo": DATA / p, "mask": DATA / m, "face": DATA / f} for p, m, f in CHARS[:a.characters]]
        tokens = client.encode_characters(chars)
        opts = {"width": a.width or a.size, "height": a.size, "steps": a.steps, "guidance": a.guidance}
        run_level(client, admin, tokens, 2, a.warmup, opts)    # warm both storymaker instances, not just one
        for c in (int(x) for x in a.concurrency.split(",")):
            level = run_level(client, admin, tokens, c, a.repeats, opts)
            rows.append({**level, "median_s": level["p50_s"], "server_rss_bytes": tree_rss_kib(srv.proc.pid) * 1024})
    return rows


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    env = environment()
    flags = {k: getattr(a, k) for k in ("weights", "size", "width", "steps", "characters", "guidance", "repeats",
                                        "warmup", "device", "precision", "dual_attention_kernel", "channels_last",
                                        "fused_qkv", "offload_encoders", "cuda_graph", "compile", "vae_precision")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for backend in a.backends.split(","):
        gc.collect()                              # the previous backend's models, before its peak is reset
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"[{backend}] {a.weights}, {a.width or a.size}x{a.size}, {a.steps} steps, {a.characters} "
              "character(s) ...", flush=True)
        if backend in ("reference", "torch-opt"):
            results = [bench_torch(a, backend)]
        elif backend == "onnxruntime":
            results = [bench_onnxruntime(a)]
        elif backend == "triton":
            results = bench_triton(a)
        else:
            raise SystemExit(f"unknown backend {backend}; use reference, torch-opt, onnxruntime, triton")
        if _flops_key(a) not in _FLOPS and a.weights in ("demo", "random-full"):
            weights = load_weights(a.weights, "meta" if a.weights == "random-full" else "cpu")
            _FLOPS[_flops_key(a)] = _image_flops(a, weights)
        flops = _FLOPS.get(_flops_key(a))
        for res in results:
            perf = {}
            if flops and "stages_median_s" in res:
                perf = achieved(flops, res["stages_median_s"], env["device_name"])
            line = {"bench": "e2e", "backend": backend, **flags, **env, **res, "flops": flops, **perf,
                    "peak_gpu_mem_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                    "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            lines.append(line)
            with a.out.open("a") as f:
                f.write(json.dumps(line) + "\n")
            extra = f" concurrency {res['concurrency']}: {res['req_per_s']} req/s" if "concurrency" in res else ""
            print(f"[{backend}] median {res['median_s']:.3f} s, p90 {res['p90_s']:.3f} s{extra}", flush=True)

    charts = plot(["--results", str(a.out), "--out", str(a.out.parent)])
    print(f"results appended to {a.out}; charts: {', '.join(p.name for p in charts)} in {a.out.parent}")
    return lines


if __name__ == "__main__":
    main()
