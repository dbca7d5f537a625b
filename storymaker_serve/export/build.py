"""`python -m export.build`: StoryMaker weights -> ONNX (+ TensorRT engines) + parity + manifest.

Stages per component (face_detector, face_recognizer, clip_vision, ppr,
text_encoder, text_encoder_2, unet, controlnet, vae_decoder): export (or copy,
for the insightface files), optional fp16 conversion, parity against the
PyTorch reference with onnxruntime, TensorRT engine where TensorRT and a GPU
exist. Stages are cached by content hash; a failing parity check fails the
build (exit 1) after printing the table. `--demo` builds the tiny random demo
bundle first (CPU, no downloads).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from storymaker_serve.export import manifest as mf
from storymaker_serve.export import parity as P
from storymaker_serve.export.components import ExportProfile
from storymaker_serve.export.faces import FILES as FACE_FILES
from storymaker_serve.export.faces import OnnxReference, build_face_model
from storymaker_serve.export.onnx_export import check_opset, export_onnx, to_fp16
from storymaker_serve.export.stage import Stage
from storymaker_serve.runtime.cli import add_component_args, argument_parser, component_paths, configure_logging
from storymaker_serve.runtime.errors import StoryMakerError, cli_exit
from storymaker_serve.runtime.few_step import sampling_defaults
from storymaker_serve.runtime.pipeline import GenerateOptions
from storymaker_serve.runtime.sampler_names import SCHEDULERS, SPACINGS
from storymaker_serve.runtime.serving.engines import session_providers

log = logging.getLogger(__name__)
TORCH_COMPONENTS = ("clip_vision", "ppr", "text_encoder", "text_encoder_2", "unet", "controlnet", "vae_decoder")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argument_parser("python -m export.build", __doc__.split("\n\n", 1)[1])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--weights", type=Path,
                     help="weights folder (sdxl/, mask.bin, image_encoder/, buffalo_l/, controlnet/)")
    src.add_argument("--demo", action="store_true", help="write and build the tiny random demo bundle (CPU, offline)")
    add_component_args(ap)
    ap.add_argument("--out", type=Path, help="build folder: manifest.json, onnx/, engines/, triton_repo/ "
                                              "(default: build/demo with --demo; required otherwise)")
    ap.add_argument("--fp16", action="store_true",
                    help="fp16 ONNX (float32 I/O, sensitive ops in fp32); VAE stays fp32")
    ap.add_argument("--fp16-vae", action="store_true", help="also the VAE in fp16 (only for an fp16-fixed VAE)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="style LoRA fused before export")
    ap.add_argument("--lora-scale", type=float, default=0.8, help="StoryMaker LoRA scale fused into the UNet")
    ap.add_argument("--max-characters", type=int, default=3)
    ap.add_argument("--min-size", type=int, help="smallest image side in pixels (default 768; demo 64)")
    ap.add_argument("--opt-size", type=int, help="TensorRT optimisation size (default 1024; demo 128)")
    ap.add_argument("--max-size", type=int, help="largest image side (default 1536; demo 256)")
    ap.add_argument("--max-batch", type=int,
                    help="images per UNet call (CFG doubles it; default 4: the steps of 4 requests in flight "
                         "share one execution)")
    ap.add_argument("--components", help="comma-separated subset to build (default: all available)")
    ap.add_argument("--parity", choices=("auto", "full", "quick", "off"), default="auto",
                    help="parity vs PyTorch: full = min/opt/max shapes, quick = the minimum shapes only, off = none "
                         "(recorded as not run); auto = full on the demo bundle, quick at full size")
    ap.add_argument("--engines", choices=("auto", "off"), default="auto",
                    help="TensorRT engines: auto = build where TensorRT and a CUDA GPU exist (default), "
                         "off = ONNX only")
    ap.add_argument("--refittable", action="store_true",
                    help="TensorRT: refittable UNet engine (another lora_scale/style LoRA via python -m export.refit)")
    ap.add_argument("--trt-version-compatible", action="store_true",
                    help="TensorRT: version-compatible engines (load on the building TensorRT and later ones of the "
                         "same major; serve with --backend-config=tensorrt,version-compatible=true)")
    ap.add_argument("--trt-hardware-compat", choices=("none", "ampere+", "same-cc"), default="none",
                    help="TensorRT hardware compatibility level (default none: this GPU's architecture only)")
    smp = ap.add_argument_group("sampling defaults (served when a request gives none; a few-step --lora sets its "
                                "authors' recommendation, these flags win)")
    smp.add_argument("--default-scheduler", choices=SCHEDULERS, help="sampler (default: unipc, the release's)")
    smp.add_argument("--default-timestep-spacing", choices=SPACINGS, help="timestep spacing (default: the config's)")
    smp.add_argument("--default-steps", type=int, help="sampling steps (default: 25)")
    smp.add_argument("--default-guidance", type=float, help="guidance scale; <= 1 runs no CFG batch (default: 7.5)")
    dep = ap.add_argument_group("deployment (where the served engine models run)")
    dep.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="engine models on the CPU or on GPUs")
    dep.add_argument("--providers", help="onnxruntime execution providers in priority order, from tensorrt, cuda, cpu "
                                         "(default: cpu; with --device cuda: cuda,cpu)")
    dep.add_argument("--gpu-instances", type=int, default=1, help="instances of each engine model per GPU")
    dep.add_argument("--denoise-engines", choices=("bls", "inprocess"), default="bls",
                     help="bls: the frame models call the unet/controlnet/vae_decoder models (one UNet execution per "
                          "step for all requests in flight); inprocess: storymaker and storymaker_stream run those "
                          "sessions themselves (no BLS per step: the lowest serving overhead, one more copy of the "
                          "engines per model)")
    ap.add_argument("--ngc-python-env", type=Path, metavar="TAR_GZ",
                    help="a conda-pack'ed Python environment with this project installed, copied into the NGC "
                         "repository for its Python-backend models (EXECUTION_ENV_PATH); default: the "
                         "container's Python")
    a = ap.parse_args(argv)
    if not (a.demo or a.weights or a.sdxl or a.mask_bin or a.image_encoder):
        ap.error("give --weights DIR, the components (--sdxl, --mask-bin, --image-encoder, ...), or --demo")
    if a.out is None:
        if not a.demo:
            ap.error("--out DIR is required: the build folder to write (e.g. --out build/prod)")
        a.out = Path("build/demo")
    return a


def build_sampling_defaults(a, loras) -> dict:
    """What the deployment serves when a request gives no scheduler, spacing, steps or guidance: a few-step LoRA's
    recommendation (runtime/few_step.py), then the --default-* flags over it."""
    flags = {"scheduler": a.default_scheduler, "timestep_spacing": a.default_timestep_spacing,
             "steps": a.default_steps, "guidance": a.default_guidance}
    out = {**sampling_defaults(loras), **{k: v for k, v in flags.items() if v is not None}}
    GenerateOptions("check", **out).validate()
    return out


def deployment(a) -> dict:
    """The manifest's deployment record: where served engine models run (configs and sessions derive from it)."""
    providers = (a.providers or ("cuda,cpu" if a.device == "cuda" else "cpu")).split(",")
    session_providers(providers)                                  # unknown names fail here, at build time
    if a.device == "cpu" and set(providers) - {"cpu"}:
        raise StoryMakerError(f"--providers {a.providers} needs --device cuda")
    if a.gpu_instances < 1:
        raise StoryMakerError("--gpu-instances must be >= 1")
    return {"device": a.device, "providers": providers, "gpu_instances": a.gpu_instances,
            "denoise_engines": a.denoise_engines}


def _is_demo_bundle(weights: Path) -> bool:
    stamp = Path(weights) / "bundle.json"
    return stamp.exists() and "storymaker-demo-bundle" in stamp.read_text()


def _profile(a, weights: Path) -> ExportProfile:
    """Shape ranges: the demo profile (64..256 px) for the demo bundle, SDXL's (768..1536 px) otherwise."""
    p = ExportProfile.demo() if _is_demo_bundle(weights) else ExportProfile()
    for k in ("min_size", "opt_size", "max_size", "max_batch"):
        if getattr(a, k) is not None:
            setattr(p, k, getattr(a, k))
    p.max_characters = a.max_characters
    if not p.min_size <= p.opt_size <= p.max_size or p.min_size % 64:
        raise StoryMakerError(f"sizes must satisfy min <= opt <= max and be multiples of 64 (got {p.min_size}, "
                              f"{p.opt_size}, {p.max_size})")
    return p


def _sources(layout, hasher) -> dict[str, dict[str, str]]:
    sd = layout.sdxl
    sub = (lambda s: sd / s) if sd.is_dir() else (lambda s: sd)
    loras = {f"{p}:{s}": hasher.file_sha(Path(p)) for p, s in layout.style_loras}
    t = lambda p, label: hasher.tree(p, label)            # keyed by role, not location: any layout, same key
    src = {
        "clip_vision": t(layout.image_encoder, "image_encoder"), "ppr": t(layout.mask_bin, "mask.bin"),
        "text_encoder": {**t(sub("text_encoder"), "sdxl/text_encoder"), **t(sub("tokenizer"), "sdxl/tokenizer"),
                         **loras},
        "text_encoder_2": {**t(sub("text_encoder_2"), "sdxl/text_encoder_2"),
                           **t(sub("tokenizer_2"), "sdxl/tokenizer_2"),
                           **loras},
        "unet": {**t(sub("unet"), "sdxl/unet"), **t(layout.mask_bin, "mask.bin"), **loras},
        "vae_decoder": t(sub("vae"), "sdxl/vae"),
    }
    if layout.controlnet:
        src["controlnet"] = t(layout.controlnet, "controlnet")
    if layout.buffalo_l:
        for name, f in FACE_FILES.items():
            src[name] = t(layout.buffalo_l / f, f"buffalo_l/{f}")
    return src


def _precision(name: str, a) -> str:
    if name == "vae_decoder":
        return "fp16" if a.fp16_vae else "fp32"
    return "fp16" if a.fp16 else "fp32"


def _parity_mode(a, weights) -> str:
    """--parity auto: every shape on the demo bundle (seconds), the minimum shapes at full size (the UNet's three
    profile shapes cost about 15 minutes on 2 cores, its minimum about one)."""
    if a.parity != "auto":
        return a.parity
    return "full" if weights is not None and _is_demo_bundle(weights) else "quick"


def _build_one(name, stage, a, out, hasher) -> dict:
    """Export/copy, convert, check one component; returns its manifest record. Order bounds memory: load, compute
    the reference outputs, export, drop the torch model, then run onnxruntime (fp32, then fp16) one session at a
    time."""
    prec = _precision(name, a)
    t0 = time.perf_counter()
    mf.reset_peak_rss()
    timings = {}

    @contextlib.contextmanager
    def timed(key):
        t = time.perf_counter()
        yield
        timings[key] = round(time.perf_counter() - t, 1)

    if name in FACE_FILES:
        spec, files, src = build_face_model(name, stage.layout.buffalo_l, out / "onnx" / name, prec)
        info = {"exporter": "copied from buffalo_l", "opset": None, "slimmed": False}
        cases = P.reference_cases(spec, OnnxReference(src, spec), P.assignments(spec, a.parity_mode))
        fp32_parity = None
    else:
        comp = stage.component(name)
        spec = comp.spec
        with timed("reference_seconds"):
            cases = P.reference_cases(spec, comp.reference, P.assignments(spec, a.parity_mode))
        if comp.prepare_export:
            comp.prepare_export()
        with timed("onnx_export_seconds"):
            info = export_onnx(comp.graph, spec, out / "onnx" / name / "model.onnx", a.opset)
        del comp
        stage.release()
        files = info.pop("files")
        with timed("parity_fp32_seconds"):
            fp32_parity = P.check(spec, files[0], cases, "fp32")
        if prec == "fp16":
            fp32_files = files
            with timed("fp16_seconds"):
                files = to_fp16(files[0], out / "onnx" / name / "model.fp16.onnx")
    if prec == "fp16" or fp32_parity is None:
        with timed(f"parity_{prec}_seconds"):
            parity = P.check(spec, files[0], cases, prec)
    else:
        parity = fp32_parity
    rec = {"files": mf.file_records(files, out, hasher), "precision": prec, "opset": info.pop("opset") or None,
           "spec": spec.to_json(), "inputs": [asdict(t) for t in spec.inputs],
           "outputs": [asdict(t) for t in spec.outputs],
           "profile": spec.profile(), "parity": parity.to_json(), "export_seconds": round(time.perf_counter() - t0, 2),
           "parity_mode": a.parity_mode, "timings": timings, "peak_rss_gib": mf.peak_rss_gib(), **info}
    if fp32_parity is not None and prec == "fp16":
        rec["parity_fp32_export"] = fp32_parity.to_json()
        rec["fp32_files"] = mf.file_records(fp32_files, out, hasher)   # what CPU-only deployments serve
    return rec


def _assets(layout, out: Path) -> dict[str, str]:
    """Copy what the served models need besides ONNX files: both tokenizers and the scheduler config."""
    base = layout.sdxl if layout.sdxl.is_dir() else layout.sdxl_config
    if base is None:
        raise StoryMakerError(f"{layout.sdxl}: a single-file SDXL needs its config folder (tokenizers) at "
                              "WEIGHTS/sdxl_config/")
    assets = {}
    for name in ("tokenizer", "tokenizer_2"):
        dst = out / "assets" / name
        shutil.copytree(base / name, dst, dirs_exist_ok=True)
        assets[name] = str(dst.relative_to(out))
    sched = out / "assets" / "scheduler_config.json"
    shutil.copyfile(base / "scheduler" / "scheduler_config.json", sched)
    assets["scheduler_config"] = str(sched.relative_to(out))
    return assets


def _table(records: dict) -> str:
    rows = [("component", "precision", "max_abs_err", "cos_sim", "tolerance", "status", "shapes")]
    for name, r in records.items():
        p = r["parity"]
        fmt = lambda v, f: "-" if v is None else format(v, f)
        rows.append((name, r["precision"], fmt(p["max_abs_err"], ".2e"), fmt(p["cos_sim"], ".6f"), p["tolerance"],
                     p["status"][:40], str(len(p["shapes"]))))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def build(a) -> int:
    from storymaker_serve.export import tensorrt as trt_build
    from storymaker_serve.runtime.weights import WeightsLayout

    check_opset(a.opset)
    deploy = deployment(a)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.demo:
        from storymaker_serve.export.demo_bundle import write_demo_bundle

        print(f"demo bundle -> {out / 'demo_bundle'}", flush=True)
        weights = write_demo_bundle(out / "demo_bundle")
    else:
        weights = a.weights
    loras = [(Path(s.rpartition(":")[0] or s), float(s.rpartition(":")[2]) if ":" in s else 1.0) for s in a.lora]
    layout = WeightsLayout.resolve(weights, style_loras=loras or None, **component_paths(a))
    prof = _profile(a, weights or layout.mask_bin.parent)
    a.parity_mode = _parity_mode(a, weights)
    hasher = mf.Hasher(out / ".hashcache.json")
    sources = _sources(layout, hasher)
    wanted = a.components.split(",") if a.components else [c for c in (*FACE_FILES, *TORCH_COMPONENTS) if c in sources]
    unknown = [c for c in wanted if c not in sources]
    if unknown:
        raise StoryMakerError(f"cannot build {unknown}: unknown component or its weights are absent; available: "
                              f"{sorted(sources)}")
    old = mf.load(out).get("components", {})
    stage, records = Stage(layout, a, prof), {}

    settings = dict(opset=a.opset, profile=asdict(prof), lora_scale=a.lora_scale)
    extra: dict = {"sampling_defaults": build_sampling_defaults(a, layout.style_loras)}
    if extra["sampling_defaults"]:
        print(f"sampling defaults served: {extra['sampling_defaults']}", flush=True)
    hasher.save()
    assets = _assets(layout, out)

    def write_manifest():
        """Written after every component and engine: an interrupted build keeps what finished."""
        hasher.save()
        return mf.write(out, {"format": 1, "assets": assets, "precision": "fp16" if a.fp16 else "fp32",
                              "tools": mf.tool_versions(),
                              "weights": {k: v for s in sources.values() for k, v in s.items()},
                              "profile": asdict(prof), "lora_scale": a.lora_scale,
                              "style_loras": [f"{p}:{s}" for p, s in loras], "components": {**old, **records},
                              "deployment": deploy, "peak_rss_gib": max(
                                  [mf.peak_rss_gib()]
                                  + [r.get("peak_rss_gib", 0.0) for r in {**old, **records}.values()]),
                              "weights_layout": {k: str(v) for k, v in asdict(layout).items()
                                                 if v is not None and k != "style_loras"}, **extra})

    for i, name in enumerate(wanted, 1):
        key = mf.stage_key({}, sources[name], precision=_precision(name, a), **settings)
        if mf.cached(old.get(name), key, out, hasher):
            records[name] = old[name]
            print(f"[{i}/{len(wanted)}] {name}: cached (inputs unchanged, files verified by sha256)", flush=True)
            continue
        print(f"[{i}/{len(wanted)}] {name}: building ({_precision(name, a)}) ...", flush=True)
        records[name] = {**_build_one(name, stage, a, out, hasher), "key": key}
        if old.get(name, {}).get("engine"):            # the engine of the old ONNX: rebuilt below if its key changed
            records[name]["engine"] = old[name]["engine"]
        write_manifest()
        p = records[name]["parity"]
        num = lambda v, f: "n/a" if v is None else format(v, f)
        print(f"[{i}/{len(wanted)}] {name}: {records[name]['export_seconds']:.1f} s, parity {p['status']} "
              f"(max_abs {num(p['max_abs_err'], '.2e')}, cos {num(p['cos_sim'], '.6f')})", flush=True)
    if a.engines == "auto":
        opts = trt_build.EngineOptions(a.refittable, a.trt_version_compatible, a.trt_hardware_compat)

        def engine_done(name, rec):
            records[name]["engine"] = rec
            write_manifest()
            if rec["status"] != "skipped":
                state = "cached" if rec.get("cached") else rec["status"]
                print(f"  TensorRT engine {name}: {state}" + (f" ({rec['error']})" if rec.get("error") else ""),
                      flush=True)

        done = trt_build.build_engines(records, out, opts, on_record=engine_done)
        skipped = {r["reason"] for r in done.values() if r["status"] == "skipped"}
        if skipped:
            print(f"TensorRT engines: skipped: {'; '.join(sorted(skipped))}", flush=True)
    else:
        for name in records:
            kept = (old.get(name) or {}).get("engine") or {}
            built = kept.get("status") == "built" and (out / kept["path"]).exists()
            records[name]["engine"] = kept if built else {"status": "skipped", "reason": "--engines off"}
    extra["engines"] = trt_build.summary({**old, **records})
    write_manifest()
    print("\nparity (onnxruntime CPU vs PyTorch reference)\n" + _table(records))
    from storymaker_serve.export.triton_repo import write_ngc_repo, write_repo

    if all(n in {**old, **records} for n in ("unet", "vae_decoder", "ppr", "clip_vision", "text_encoder")):
        repo = write_repo(out)
        ngc, backends = write_ngc_repo(out, python_env=a.ngc_python_env)
        extra["ngc_repository"] = backends
        write_manifest()
        engine_failed = {n: b["why"] for n, b in backends.items() if "failed" in b["why"]}   # skips: said above
        print(f"Triton model repository: {repo} (bundled server); {ngc} (NGC container), engine models: "
              + ", ".join(f"{n} {b['backend']}" + (f" ({engine_failed[n]})" if n in engine_failed else "")
                          for n, b in backends.items()))
    failed = [n for n, r in records.items() if r["parity"]["status"] == "failed"]
    print(f"\nmanifest: {out / 'manifest.json'}")
    if failed:
        print(f"BUILD FAILED: parity failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    configure_logging(a)
    return cli_exit(build, a, catch=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
