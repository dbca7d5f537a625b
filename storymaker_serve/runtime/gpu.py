"""Which GPU and TensorRT this host has, and whether a build's engine records can load here (a TensorRT engine
runs on the TensorRT version and the GPU compute capability it was built for, unless built to be compatible)."""
from __future__ import annotations

from importlib import metadata

import torch


def gpu_identity() -> dict:
    """{"gpu": name, "compute_capability": "9.0"} of the first CUDA GPU, or {} without one."""
    if not torch.cuda.is_available():
        return {}
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def tensorrt_version() -> str | None:
    """The TensorRT Python package installed here, or None."""
    try:
        return metadata.version("tensorrt")
    except metadata.PackageNotFoundError:
        return None


def runs_on(engine: dict, compute_capability: str) -> bool:
    """Does an engine record load on a GPU of this compute capability? `ampere+` engines on 8.0 and later; others
    only on the capability they were built for (an old record without one is taken at its word)."""
    if engine.get("hardware_compatibility") == "ampere+":
        return float(compute_capability) >= 8.0
    return engine.get("compute_capability") in (None, compute_capability)


def trt_loads(engine: dict, runtime_version: str) -> bool:
    """Does a TensorRT `runtime_version` load this engine record? Exact version, or with a version-compatible
    engine any later version of the same major (TensorRT's documented rule)."""
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:3] if x.isdigit())
    built, run = as_tuple(engine["tensorrt"]), as_tuple(runtime_version)
    if not engine.get("version_compatible"):
        return built == run
    return run[:1] == built[:1] and run >= built
