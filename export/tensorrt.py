"""TensorRT engines from the build's ONNX files (WRITTEN, NOT RUN HERE: no TensorRT on our machines).

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

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
REFITTABLE = ("unet",)
WORKSPACE = 8 << 30


@dataclass
class EnginePlan:
    component: str
    onnx_path: Path
    engine_path: Path
    profile: dict[str, dict[str, tuple[int, ...]]]   # input -> {min, opt, max}
    strongly_typed: bool = True
    refittable: bool = False
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


def plan_engines(records: dict, out: Path, refittable: bool = False) -> list[EnginePlan]:
    """One plan per ONNX component in the manifest records."""
    plans = []
    for name, rec in records.items():
        onnx_file = out / rec["files"][0]["path"]
        prof = {k: {w: tuple(v) for w, v in s.items()} for k, s in rec["profile"].items()}
        plans.append(EnginePlan(name, onnx_file, out / "engines" / f"{name}.plan", prof,
                                refittable=refittable and name in REFITTABLE))
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


def refit_engine(engine_path: Path, onnx_path: Path, out_path: Path | None = None) -> Path:
    """Load the weights of `onnx_path` (same graph, e.g. another lora_scale) into a refittable engine."""
    trt, logger = _trt()
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None or not engine.refittable:
        raise RuntimeError(f"{engine_path}: not a refittable engine; rebuild with --engines --refittable")
    refitter = trt.Refitter(engine, logger)
    if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(onnx_path)):
        raise RuntimeError(f"{onnx_path}: its weights do not match the engine's graph (export it with the same spec)")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"{engine_path}: refit failed")
    target = Path(out_path or engine_path)
    target.write_bytes(bytes(engine.serialize()))
    return target


def build_engines(records: dict, out: Path, refittable: bool = False) -> dict:
    ok, reason = availability()
    plans = plan_engines(records, out, refittable)
    if not ok:
        return {"status": "skipped", "reason": reason, "planned": [p.component for p in plans]}
    built = {}
    for p in plans:
        log.info("building TensorRT engine for %s", p.component)
        built[p.component] = str(build_engine(p).relative_to(out))
    return {"status": "built", "reason": "", "engines": built}
