"""The Triton BLS models that run the denoising loop (`sampler`, `storymaker`, `storymaker_stream`): what they share.

`Sampling` is what a loop needs from a build (the typed manifest, the UniPC plans, the engines as BLS calls or
in-process sessions with I/O binding, one `StepBatcher` for every loop in flight); `SamplingModel` is their Triton
side (one instance serves many requests, each on its own thread, answered through its response sender);
`StageMetrics` exports per-stage times and the batcher's rows per execution as Triton custom metrics.
`pb_utils` is passed in, never imported here.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time

import numpy as np
import torch

from storymaker_serve.runtime import fused
from storymaker_serve.runtime.denoise import EngineDenoiser
from storymaker_serve.runtime.serving.batcher import StepBatcher
from storymaker_serve.runtime.serving.engines import Build
from storymaker_serve.runtime.serving.glue import Glue, _request_id, setup, text_engine_fns
from storymaker_serve.runtime.serving.logic import generate_latents
from storymaker_serve.runtime.serving.pool import LifoPool

log = logging.getLogger("storymaker.triton")


class Sampling:
    """What a BLS model running the denoising loop needs from a build: the typed manifest, the UniPC plans
    per step count, and EngineDenoisers whose `unet` (and `controlnet`) calls go through one StepBatcher
    (runtime/serving/batcher.py): the loops of all requests in flight share each UNet execution, one BLS call per
    step for all of them, up to the engine profile's batch limit."""

    def __init__(self, glue: Glue, build_dir: str, send_zero_residuals: str | bool = False, max_wait_ms: float = 10.0,
                 engines: str = "bls"):
        if engines not in ("bls", "inprocess"):
            raise ValueError(f"config parameter denoise_engines={engines!r}: use bls or inprocess")
        self.glue, self.build = glue, Build(build_dir)
        self.send_zero_residuals = str(send_zero_residuals).lower() == "true"
        self.dim, self.plans = self.build.cross_attention_dim, {}
        names = ["unet"] + (["controlnet"] if self.build.has("controlnet") else [])
        self.device = None
        # this process runs the sessions with I/O binding: nothing per step leaves it
        if engines == "inprocess":
            sessions = {n: self.build.engine(n) for n in names + ["vae_decoder"]}
            fns = {n: sessions[n].run_bound for n in names}
            vae = sessions["vae_decoder"].run_bound
            self.device, self.send_zero_residuals = sessions["unet"].device, False
            self.vae01 = lambda lat: vae({"latent": torch.as_tensor(lat)})["image"]
            self.text_fns = None             # TextEncoding's default: the text encoders' sessions, in process too
        else:
            outs = {n: self.build.component(n).output_names for n in names}
            fns = {n: (lambda f, n=n: glue.engine(n, f, outs[n], batched=True)) for n in names}
            self.vae01 = lambda lat: glue.engine("vae_decoder", {"latent": _host(lat)}, ["image"])["image"]
            self.text_fns = text_engine_fns(glue, self.build)
        self.batcher = StepBatcher(fns, {n: self.build.component(n).spec.max_batch() for n in names},
                                   max_wait_ms / 1000.0)
        fused.warm_up()                      # the loop's host kernels compiled (or loaded from cache) before a request

    def denoiser(self):
        b = self.batcher
        return EngineDenoiser(self.build.component("unet"), b.fn("unet"),
                              b.fn("controlnet") if "controlnet" in b.fns else None,
                              self.build.text_len, self.send_zero_residuals, self.device)

    def latents(self, opts, text, tokens, is_cancelled, on_step=None):
        with self.batcher.loop():
            return generate_latents(opts, text, tokens, self.denoiser(), self.build, self.plans, is_cancelled, on_step)


def _host(x) -> np.ndarray:
    """float32 contiguous numpy on the host, from numpy or a torch tensor on any device."""
    return np.ascontiguousarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x, np.float32)


class StageMetrics:
    """Per-stage time of every request as Triton custom metrics on the metrics port (Python backend metrics API):
    `storymaker_stage_seconds_total{model, stage}` (seconds spent) and `storymaker_stage_count_total{model,
    stage}` (times run), so an operator sees where requests spend their time (rate(seconds)/rate(count) is the
    mean per stage). A no-op where the stub has no metrics API.

    Each metric increment is a round trip from the stub to the server, so nothing is sent on a request's path:
    stages and batcher executions add to counters here, and `flush()` (after a response is sent) wakes a thread of
    this object that makes one increment per series touched since its last send. Measured: sent per step, the
    batcher's execution counts and the cancellation check took a third of the served loop's time at 960x1280 with
    stand-in engines; sent by the request thread after its response, they kept that thread busy when the next
    request came (runtime/serving/pool.py)."""

    def __init__(self, pb, model: str):
        self.model, self.seconds, self.count, self.series = model, None, None, {}
        self.pending: dict[tuple, list] = {}
        self.lock = threading.Lock()        # the counters
        # only the sender thread creates and increments metrics, so one metrics call at a time: tritonserver 2.51's
        # Python backend crashes (SIGSEGV, measured) when request threads create or increment them concurrently
        self.due = threading.Event()
        self.sender: threading.Thread | None = None
        fam = getattr(pb, "MetricFamily", None)
        if fam is not None:
            self.seconds = fam(name="storymaker_stage_seconds_total", description="seconds spent per request stage",
                               kind=fam.COUNTER)
            self.count = fam(name="storymaker_stage_count_total", description="request stages run", kind=fam.COUNTER)
            self.rows = fam(name="storymaker_engine_rows_total", description="rows run by the step batcher",
                            kind=fam.COUNTER)
            self.execs = fam(name="storymaker_engine_executions_total", description="step batcher executions",
                             kind=fam.COUNTER)

    def execution(self, engine: str, rows: int) -> None:
        """One engine execution of the step batcher: `storymaker_engine_rows_total{model, engine}` and
        `storymaker_engine_executions_total{model, engine}` (rows / executions = the mean batch, in either
        denoise_engines mode)."""
        if self.seconds is not None:
            self._add({"engine": engine}, (self.rows, self.execs), (rows, 1))

    def _add(self, label: dict, families: tuple, amounts: tuple) -> None:
        """Add to one series of each family (sent by the next flush)."""
        key = tuple(label.items())
        with self.lock:
            if key in self.pending:
                self.pending[key][1] = [a + b for a, b in zip(self.pending[key][1], amounts)]
            else:
                self.pending[key] = [families, list(amounts)]

    def flush(self) -> None:
        """Have what was added so far sent soon, by this object's sender thread (started on first use)."""
        if self.seconds is None:
            return
        with self.lock:
            if self.sender is None:
                self.sender = threading.Thread(target=self._sender, daemon=True, name="metrics")
                self.sender.start()
        self.due.set()

    def _sender(self) -> None:
        while True:
            self.due.wait()
            self.due.clear()
            try:
                self.send()
            except Exception:  # noqa: BLE001 - metrics never take a request or the model down
                log.exception("could not send the stage metrics")

    def send(self) -> None:
        """Send what was added since the last send: one increment per series (created on first use). The sender
        thread's work: it is the only caller."""
        with self.lock:
            pending, self.pending = self.pending, {}
        for key, (families, amounts) in pending.items():
            if key not in self.series:
                labels = {"model": self.model, **dict(key)}
                self.series[key] = tuple(f.Metric(labels=labels) for f in families)
            for metric, amount in zip(self.series[key], amounts):
                metric.increment(amount)

    def stage(self, name: str):
        @contextlib.contextmanager
        def timed():
            t0 = time.perf_counter()
            yield
            if self.seconds is not None:
                self._add({"stage": name}, (self.seconds, self.count), (time.perf_counter() - t0, 1))

        return timed()


def _import_before_threads() -> None:
    """Modules the request threads import lazily, imported once here: diffusers' lazy module loader is not safe when
    several threads trigger the same first import (measured: ImportError of UniPCMultistepScheduler under 8
    concurrent first requests)."""
    import PIL.Image  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401
    from diffusers import UniPCMultistepScheduler  # noqa: F401
    from diffusers.utils.torch_utils import randn_tensor  # noqa: F401

    import storymaker_serve.runtime.denoise  # noqa: F401
    import storymaker_serve.runtime.pipeline  # noqa: F401
    import storymaker_serve.runtime.preprocess  # noqa: F401
    import storymaker_serve.runtime.serving.logic  # noqa: F401


class SamplingModel:
    """Base of the Triton BLS models that run the denoising loop (`sampler`, `storymaker`, `storymaker_stream`):
    their model.py sets `pb` (triton_python_backend_utils, importable only inside the stub) and defines
    `_one(request) -> outputs` (or overrides `_respond`).

    One instance serves many requests at once: `execute` hands each request to a thread of a pool of
    `max_inflight` (config parameter) and returns; the thread answers through the request's response sender
    (Triton's default mode allows that; decoupled models send several responses). The loops of those threads
    share the UNet's executions through `Sampling.batcher`. Requests beyond `max_inflight` wait for a thread."""

    pb = None

    def initialize(self, args):
        _, params = setup(args)
        self.glue = Glue(self.pb, params)
        self.sampling = Sampling(self.glue, params["build_dir"], params.get("send_zero_residuals", "false"),
                          float(params.get("step_batch_wait_ms", 10.0)), params.get("denoise_engines", "bls"))
        self.metrics = StageMetrics(self.pb, params.get("component", "storymaker"))
        self.sampling.batcher.on_execution = self.metrics.execution
        self.pool = LifoPool(int(params.get("max_inflight", 16)), "request")
        _import_before_threads()

    def execute(self, requests):
        for r in requests:
            self.pool.submit(self._answer, r, r.get_response_sender())
        return None

    def _answer(self, r, sender):
        """Answer one request on its thread (`_respond`), then have the metrics it added sent (off its path)."""
        try:
            self._respond(r, sender)
        finally:
            self.metrics.flush()

    def _respond(self, r, sender):
        """One response: `_one`'s outputs, or the request's error (the decoupled stream model sends several)."""
        try:
            out = self._one(r)
        except Exception as e:  # noqa: BLE001 - this request's error response
            return self._send(sender, self.glue.error(e, r), r)
        with self.metrics.stage("respond"):               # the output tensors into the server's memory, then sent
            try:
                response = self.glue.respond(out)
            except Exception as e:  # noqa: BLE001
                response = self.glue.error(e, r)
            self._send(sender, response, r)

    def _send(self, sender, response, r) -> None:
        try:
            sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - the client is gone: nothing to tell
            log.warning("could not send the response of request %s", _request_id(r))

    def finalize(self):
        self.pool.shutdown(wait=True)
