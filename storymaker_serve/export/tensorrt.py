"""TensorRT engines from the build's ONNX files (WRITTEN, NOT RUN: they have not been built with TensorRT yet).

Written against TensorRT 10's documented Python API: strongly typed networks
(the ONNX dtypes decide the precision, so fp16 comes from the fp16 ONNX),
`OnnxParser` with `NATIVE_INSTANCENORM`, one optimisation profile per engine
whose min/opt/max shapes come from the component's spec (via the manifest
record: the same source as ONNX axes and Triton dims), an optional refittable
UNet, and a refit path (`OnnxParserRefitter`) that loads the weights of a
re-exported ONNX with another `lora_scale` or style LoRA into an existing
engine without a rebuild. Everything up to the TensorRT calls, the `EnginePlan`,
is plain Python and unit-tested on a CPU; `build_engines` says clearly why it
skips when TensorRT or a GPU is missing. No subprocess, no `shell=True`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from storymaker_serve.export.manifest import model_file
from storymaker_serve.runtime.gpu import gpu_identity, tensorrt_version

log = logging.getLogger(__name__)
REFITTABLE = ("unet",)
WORKSPACE = 8 << 30


HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built; recorded per engine in the manifest.

    version_compatible: TensorRT's VERSION_COMPATIBLE flag (TensorRT >= 8.6): the engine embeds a lean runtime
    and loads on the building TensorRT and later versions of the same major; Triton's TensorRT backend then
    needs `--backend-config=tensorrt,version-compatible=true` (runtime.serve --ngc-command prints it). Without it
    an engine loads only on the exact TensorRT version that built it (recorded as `tensorrt`).
    hardware_compatibility: none (this GPU's architecture only), ampere+ (any Ampere or newer GPU), same-cc
    (GPUs of the same compute capability); wider compatibility can cost speed."""

    refittable: bool = False
    version_compatible: bool = False
    hardware_compatibility: str = "none"

    def __post_init__(self):
        if self.hardware_compatibility not in HARDWARE_LEVELS:
            raise ValueError(f"hardware compatibility {self.hardware_compatibility!r}: use one of "
                             f"{sorted(HARDWARE_LEVELS)}")


@dataclass
class EnginePlan:
    component: str
    onnx_path: Path
    engine_path: Path
    profile: dict[str, dict[str, tuple[int, ...]]]   # input -> {min, opt, max}
    strongly_typed: bool = True
    refittable: bool = False
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    workspace_bytes: int = WORKSPACE
    parser_flags: tuple[str, ...] = ("NATIVE_INSTANCENORM",)
    builder_optimization_level: int = 3
    notes: list[str] = field(default_factory=list)


def availability() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt Python package is not installed (pip install tensorrt on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, "ok"


def plan_engines(records: dict, out: Path, opts: EngineOptions = EngineOptions()) -> list[EnginePlan]:
    """One plan per ONNX component in the manifest records (the face models included)."""
    plans = []
    for name, rec in records.items():
        onnx_file = out / model_file(rec)
        prof = {k: {w: tuple(v) for w, v in s.items()} for k, s in rec["profile"].items()}
        plans.append(EnginePlan(name, onnx_file, out / "engines" / f"{name}.plan", prof,
                                refittable=opts.refittable and name in REFITTABLE,
                                version_compatible=opts.version_compatible,
                                hardware_compatibility=opts.hardware_compatibility))
    return plans


def _trt():
    import tensorrt as trt

    return trt, trt.Logger(trt.Logger.WARNING)


def build_engine(plan: EnginePlan) -> Path:
    trt, logger = _trt()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    for f in plan.parser_flags:
        parser.set_flag(getattr(trt.OnnxParserFlag, f))
    if not parser.parse_from_file(str(plan.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{plan.onnx_path}: TensorRT could not parse the ONNX file: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.builder_optimization_level
    if plan.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if plan.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if plan.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      HARDWARE_LEVELS[plan.hardware_compatibility])
    profile = builder.create_optimization_profile()
    for name, s in plan.profile.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{plan.component}: TensorRT engine build failed (see the TensorRT log above)")
    plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
    plan.engine_path.write_bytes(bytes(serialized))
    return plan.engine_path


def refit_engine(engine_path: Path, onnx_path: Path, out_path: Path | None = None,
                 version_compatible: bool = False) -> Path:
    """Load the weights of `onnx_path` (same graph, e.g. another lora_scale) into a refittable engine.
    Callers check first that the ONNX's weight names match the engine's source (refit_names_match)."""
    trt, logger = _trt()
    runtime = trt.Runtime(logger)
    if version_compatible:      # a version-compatible plan embeds a lean runtime: host code must be allowed
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None or not engine.refittable:
        raise RuntimeError(f"{engine_path}: not a refittable engine; rebuild it with "
                           "`python -m export.build ... --engines auto --refittable`")
    refitter = trt.Refitter(engine, logger)
    if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(onnx_path)):
        raise RuntimeError(f"{onnx_path}: its weights do not match the engine's graph (export it with the same spec)")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"{engine_path}: refit failed")
    target = Path(out_path or engine_path)
    target.write_bytes(bytes(engine.serialize()))
    return target


def engine_key(component_key: str, plan: EnginePlan) -> str:
    gpu = "ampere+" if plan.hardware_compatibility == "ampere+" else gpu_identity().get("compute_capability")
    blob = json.dumps({"component": component_key, "refittable": plan.refittable, "tensorrt": tensorrt_version(),
                       "compute_capability": gpu,
                       "version_compatible": plan.version_compatible, "hw": plan.hardware_compatibility,
                       "profile": {k: {w: list(v) for w, v in p.items()} for k, p in plan.profile.items()}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_engines(records: dict, out: Path, opts: EngineOptions = EngineOptions(), on_record=None) -> dict[str, dict]:
    """Build one engine per component, independently: a failure is recorded for that component and the others
    still build. Returns {component: engine record}; `on_record(name, record)` is called after each one so the
    caller can write the manifest at once. An engine whose key (component key, options, TensorRT version, the GPU's
    compute capability, profile) is unchanged and whose file still exists is reused ("cached"); so is a built one
    where TensorRT or a GPU is missing now (a rebuild elsewhere never drops the engines)."""
    ok, reason = availability()
    result = {}
    for p in plan_engines(records, out, opts):
        base = {"tensorrt": tensorrt_version(), **gpu_identity(), "refittable": p.refittable,
                "version_compatible": p.version_compatible,
                "hardware_compatibility": p.hardware_compatibility}
        key = engine_key(records[p.component].get("key", ""), p)
        old = records[p.component].get("engine") or {}
        if not ok and old.get("status") == "built" and (out / old["path"]).exists():
            rec = {**old, "cached": True}               # no TensorRT here now: the engine built before stays
        elif not ok:
            rec = {**base, "status": "skipped", "reason": reason}
        elif old.get("status") == "built" and old.get("key") == key and (out / old["path"]).exists():
            rec = {**old, "cached": True}
        else:
            import time

            log.info("building TensorRT engine for %s", p.component)
            t0 = time.perf_counter()
            try:
                path = build_engine(p)
                rec = {**base, "status": "built", "path": str(path.relative_to(out)), "bytes": path.stat().st_size,
                       "seconds": round(time.perf_counter() - t0, 1), "key": key}
            except Exception as e:  # noqa: BLE001 - one engine's failure is recorded, the others still build
                log.exception("TensorRT engine for %s failed", p.component)
                rec = {**base, "status": "failed", "error": f"{type(e).__name__}: {str(e)[:500]}"}
        result[p.component] = rec
        if on_record is not None:
            on_record(p.component, rec)
    return result


def summary(components: dict) -> dict:
    """Top-level manifest view of the per-component engine records: who built what with which TensorRT."""
    by_status: dict[str, list[str]] = {}
    for name, rec in components.items():
        by_status.setdefault((rec.get("engine") or {}).get("status", "none"), []).append(name)
    built = [components[n]["engine"] for n in by_status.get("built", [])]
    return {"tensorrt": sorted({e["tensorrt"] for e in built}) or None, **by_status,
            "version_compatible": all(e["version_compatible"] for e in built) if built else None}
