"""Engine runners driven by a build's `manifest.json` (the export/runtime contract).

`Build(path)` reads the manifest; `build.engine(name)` returns an
`OrtEngine` for that component: an onnxruntime session plus the tensor names,
dtypes and profile from the manifest's spec, so served models never restate a
tensor list. `OrtEngine.run_batched` concatenates several requests' inputs
along axis 0 when their other dims agree (Triton's dynamic batcher hands the
Python backend a list of requests, not one tensor), runs once and splits the
outputs back. `OrtEngine.run_bound` is the same call over torch tensors with
onnxruntime's I/O binding: inputs are read where they lie and outputs written
into tensors allocated on the engine's device, so a loop that keeps its
latents, embeddings and ControlNet residuals there moves nothing to the host
per step (the `inprocess` frame models). TensorRT engines plug in here once
built (written for the GPU path, see export/tensorrt.py).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from storymaker_serve.runtime.errors import DeploymentError, InputError
from storymaker_serve.runtime.manifest import Component, Manifest

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def session_providers(names, device_id: int = 0, cache_dir: str | None = None,
                      profile: dict | None = None) -> tuple[list[str], list[dict]]:
    """onnxruntime execution providers, in priority order, with their options (WRITTEN for the GPU, not run here):
    CUDA on `device_id` (heuristic cuDNN algorithm search, copies on the default stream); TensorRT with fp16
    kernels allowed, its engine and timing caches kept in `cache_dir` (first load builds, later loads reuse) and,
    given the component's `profile` ({input: {min, opt, max}}), one explicit optimisation profile with those
    shapes, so the TensorRT EP builds one engine for the whole range instead of one per new input shape; the CPU
    last as the fallback for any op the others lack."""
    trt = {"device_id": str(device_id), "trt_fp16_enable": "1", "trt_engine_cache_enable": "1",
           "trt_engine_cache_path": str(cache_dir or "."), "trt_timing_cache_enable": "1"}
    if profile:
        for key, which in (("trt_profile_min_shapes", "min"), ("trt_profile_opt_shapes", "opt"),
                           ("trt_profile_max_shapes", "max")):
            trt[key] = ",".join(f"{name}:{'x'.join(str(d) for d in p[which])}" for name, p in profile.items())
    opts = {"cpu": {}, "cuda": {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC",
                                "do_copy_in_default_stream": "1"}, "tensorrt": trt}
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"execution providers {unknown}: use {sorted(PROVIDERS)} (e.g. tensorrt,cuda,cpu)")
    return [PROVIDERS[n] for n in names], [opts[n] for n in names]


def require_providers(wanted: list[str], have: list[str], component: str, session: bool = False) -> None:
    """Refuse to run a component whose deployment asks for a GPU execution provider that onnxruntime does not give
    it (onnxruntime itself only warns and runs on the CPU, and I/O binding on the GPU then fails at the first
    request). `have`: the providers this onnxruntime offers, or (session=True) the ones the session really got."""
    missing = [p for p in wanted if p != PROVIDERS["cpu"] and p not in have]
    if not missing:
        return
    where = "the session got" if session else "this onnxruntime offers"
    raise DeploymentError(
        f"{component}: the deployment asks for {', '.join(missing)}, but {where} only {', '.join(have) or 'none'}. "
        f"Install the GPU build of ONNX Runtime alone (pip uninstall -y onnxruntime onnxruntime-gpu && "
        f"pip install -r requirements/lock-gpu.txt --no-deps), check the CUDA and cuDNN libraries it needs "
        f"(python -m storymaker_serve.envcheck), or rebuild with --device cpu")


class OrtEngine:
    def __init__(self, path: Path, record: Component, threads: int | None = None, providers=("cpu",),
                 device_id: int = 0, cache_dir: str | None = None):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if set(providers) <= {"cpu"}:
            # Weights stay in the page-aligned external data file, mapped, instead of packed copies on the heap:
            # the full-size UNet loads with 1.5 GiB resident instead of 11 GiB, and its weights are clean file pages
            # the kernel can drop under pressure (GEMMs about 13% slower here). A whole full-size repository then
            # fits a 24 GiB host (docs/export.md).
            opts.add_session_config_entry("session.disable_prepacking", "1")
        names, options = session_providers(providers, device_id, cache_dir, record.profile)
        require_providers(names, ort.get_available_providers(), record.name)
        self.sess = ort.InferenceSession(str(path), opts, providers=names, provider_options=options)
        require_providers(names, self.sess.get_providers(), record.name, session=True)
        self.record = record
        self.inputs, self.outputs = record.input_names, record.output_names
        self.profile = record.profile
        self._zeros: dict = {}
        self._bound_zeros: dict = {}         # the same, as tensors on self.device (run_bound)
        # where run_bound's tensors live: the GPU of a CUDA/TensorRT session (written, not run here), else the host
        self.device = f"cuda:{device_id}" if set(providers) & {"cuda", "tensorrt"} else "cpu"

    def check_profile(self, feeds: dict[str, np.ndarray], skip_batch: bool = False) -> None:
        """Reject shapes outside the engine's min/max profile with a message naming the input.
        skip_batch: a dynamically batched request's own batch may be below the profile's minimum."""
        for name, arr in feeds.items():
            p = self.profile.get(name)
            if p is None:
                continue
            lo, hi = list(p["min"]), list(p["max"])
            if skip_batch and lo:
                lo[0] = 1
            if len(arr.shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(arr.shape, lo, hi)):
                raise InputError(f"{self.record.name}: input {name} has shape {list(arr.shape)}, outside "
                                 f"the engine profile {list(lo)}..{list(hi)}; rebuild with wider --min-size/--max-size")

    def complete(self, feeds: dict, bound: bool = False, values: dict | None = None) -> dict:
        """Feeds with the inputs a caller may leave out (TensorSpec.zero_default: the UNet's ControlNet residuals
        without a pose map) filled with zeros, allocated here once per shape instead of shipped per step: numpy
        arrays, or with `bound` torch tensors on this engine's device (run_bound). `values`: the symbol values
        already bound from these feeds, if the caller has them."""
        spec = self.record.spec
        missing = [t for t in spec.inputs if t.name not in feeds]
        if not missing:
            return feeds
        for t in missing:
            if not t.zero_default:
                raise InputError(f"{self.record.name}: missing required input {t.name}")
        values = values if values is not None else spec.bind({k: tuple(v.shape) for k, v in feeds.items()})
        if not bound:
            return {**feeds, **spec.zeros(missing, values, self._zeros)}

        return {**feeds, **spec.zeros(missing, values, self._bound_zeros,
                                      lambda shape: torch.zeros(shape, device=self.device))}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.complete(feeds)
        return dict(zip(self.outputs, self.sess.run(self.outputs, {k: feeds[k] for k in self.inputs})))

    def run_bound(self, feeds: dict) -> dict:
        """`run` over torch tensors with I/O binding: each input is bound where it lies (a tensor on this engine's
        device, by pointer: no copy; others are moved there first) and each output is a tensor allocated on the
        device at the shape the spec derives from the inputs, written by the engine in place. Absent zero-default
        inputs (ControlNet residuals) are zeros on the device, allocated once per shape. On a GPU the torch stream is
        synchronised before the run (the engine reads what torch wrote; onnxruntime synchronises its own stream
        before returning), so the outputs are ready for the next torch op."""
        spec, (kind, _, index) = self.record.spec, self.device.partition(":")
        dev = torch.device(self.device)
        feeds = {k: v.to(dev, getattr(torch, spec.input(k).dtype)).contiguous()
                 for k, v in feeds.items() if k in self.inputs}
        self.check_profile(feeds)            # in process there is no engine model's glue to check it
        values = spec.bind({k: tuple(v.shape) for k, v in feeds.items()})  # the zeros' shapes derive from these
        feeds = self.complete(feeds, bound=True, values=values)
        io, dev_id = self.sess.io_binding(), int(index or 0)
        for t in spec.inputs:
            v = feeds[t.name]
            io.bind_input(t.name, kind, dev_id, np.dtype(t.dtype), tuple(v.shape), v.data_ptr())
        outs = {}
        for t in spec.outputs:
            o = outs[t.name] = torch.empty(t.shape(values), dtype=getattr(torch, t.dtype), device=dev)
            io.bind_output(t.name, kind, dev_id, np.dtype(t.dtype), tuple(o.shape), o.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        self.sess.run_with_iobinding(io)
        return outs

    def run_batched(self, many: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Run compatible feeds as one batch (grouped by non-batch shapes); results in input order."""
        groups: dict[tuple, list[int]] = {}
        many = [self.complete(f) for f in many]
        for i, f in enumerate(many):
            groups.setdefault(tuple((k, f[k].shape[1:]) for k in self.inputs), []).append(i)
        results: list = [None] * len(many)
        for idx in groups.values():
            sizes = [many[i][self.inputs[0]].shape[0] for i in idx]
            feeds = {k: np.concatenate([many[i][k] for i in idx]) for k in self.inputs}
            out = self.run(feeds)
            offsets = np.cumsum([0] + sizes)
            for j, i in enumerate(idx):
                results[i] = {k: v[offsets[j]:offsets[j + 1]] for k, v in out.items()}
        return results


class Build(Manifest):
    """A build folder: its typed manifest (runtime/manifest.py) plus onnxruntime sessions of its components."""

    def engine(self, name: str, threads: int | None = None, device_id: int = 0) -> OrtEngine:
        """A session with the build's deployment providers (`export.build --device/--providers`; CPU when none)."""
        rec = self.component(name)
        if factory := self.deployment.get("engine_factory"):
            return _load_factory(factory)(rec)
        threads = threads or int(os.environ.get("STORYMAKER_ORT_THREADS", "0")) or None
        providers = self.deployment["providers"]
        return OrtEngine(self.file(rec.files_for(providers)[0].path), rec, threads, providers, device_id,
                         str(self.path / "engines" / "ort_trt_cache"))


def _load_factory(dotted: str):
    """`module:name` -> that callable (a manifest's `deployment.engine_factory`: record -> engine)."""
    module, _, attr = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise DeploymentError(f"deployment.engine_factory {dotted!r} cannot be loaded ({e}); "
                              "give module:name") from None
