"""Helpers shared by the Triton Python-backend models; `pb_utils` is passed in, never imported here.

Every model.py in triton_repo/ is thin: it parses its config once, then hands
each request to a function from runtime/ through `Glue.run_each`, which turns
`InputError`/`WeightsError` into an INVALID_ARG error for that request only,
`Cancelled` into CANCELLED, a called model's error into that model's own code,
and anything else into INTERNAL with a request id (the traceback goes to the
server log under that id, never to the client). Budgets (contract.LIMITS, config
parameters) are checked from input sizes before anything is decoded or forwarded.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

from runtime.errors import InputError, StoryMakerError

log = logging.getLogger("storymaker.triton")


INVALID = "invalid input: "      # leads every client-mistake message our models send


class CalleeError(Exception):
    """A model called through BLS answered with an error: passed on with the callee's own code. Where the server
    reports every BLS error as INTERNAL (tritonserver 2.51 does), our models' client-mistake messages carry the
    INVALID prefix and cancellations their own wording, which restores the code."""

    def __init__(self, model: str, message: str, code, pb):
        super().__init__(f"{model}: {message}")
        E = pb.TritonError
        if code is None or code == E.INTERNAL:
            code = E.INVALID_ARG if message.startswith(INVALID) else \
                E.CANCELLED if message.startswith("request cancelled") else E.INTERNAL
        self.code = code


def setup(args: dict) -> tuple[dict, dict]:
    """(model config, parameters) from Triton's initialize() args; puts the project root on sys.path.

    A relative `build_dir` (the NGC repository writes "../..") is resolved against the model's own folder
    (`args["model_repository"]`), so a build folder can be moved or mounted anywhere as a whole."""
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    bd = params.get("build_dir")
    if bd and not os.path.isabs(bd):
        params["build_dir"] = os.path.normpath(os.path.join(args["model_repository"], bd))
    root = params.get("project_root")
    if root and root not in sys.path:
        sys.path.insert(0, root)
    return cfg, params


class Glue:
    def __init__(self, pb, params: dict | None = None):
        from runtime.serving.contract import LIMITS

        self.pb = pb
        self.limits = {k: int((params or {}).get(k, v)) for k, v in LIMITS.items()}

    # ---- inputs ----
    def array(self, request, name: str, required: bool = False):
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:
            if required:
                raise InputError(f"missing required input {name}")
            return None
        return t.as_numpy()

    def texts(self, request, name: str, required: bool = False, max_bytes: int | None = None) -> list[str] | None:
        raw = self.blobs(request, name, required, max_bytes)
        if raw is None:
            return None
        try:
            return [b.decode("utf-8") for b in raw]
        except UnicodeDecodeError:
            raise InputError(f"{name} must be UTF-8 text") from None

    def blobs(self, request, name: str, required: bool = False, max_bytes: int | None = None) -> list[bytes] | None:
        a = self.array(request, name, required)
        if a is None:
            return None
        cap = max_bytes or self.limits["max_element_bytes"]
        for x in a.reshape(-1):
            if len(x) > cap:
                raise InputError(f"{name}: an element of {len(x)} bytes exceeds the limit of {cap} bytes "
                                 f"(config parameter max_{'prompt' if max_bytes else 'element'}_bytes)")
        return [bytes(x) for x in a.reshape(-1)]

    def prompt(self, request, name: str = "PROMPT", required: bool = True) -> str | None:
        """A prompt within the byte budget, checked before it is decoded or tokenised."""
        t = self.texts(request, name, required, self.limits["max_prompt_bytes"])
        return t[0] if t else None

    def check_request_budget(self, request, max_characters: int) -> None:
        """Before anything is decoded or forwarded: the character count first, then every element's size and the
        total size of the images (PHOTOS, MASKS, CLOTHS, FACE_INFO, POSE)."""
        from runtime.serving.contract import IMAGE_INPUTS

        photos = self.array(request, "PHOTOS")
        if photos is not None and not 1 <= photos.size <= max_characters:
            raise InputError(f"{photos.size} characters given; this deployment supports 1 to {max_characters} per image")
        total, cap, each = 0, self.limits["max_request_bytes"], self.limits["max_element_bytes"]
        for name in IMAGE_INPUTS:
            a = self.array(request, name)
            for x in (() if a is None else a.reshape(-1)):
                if len(x) > each:
                    raise InputError(f"{name}: an element of {len(x)} bytes exceeds the limit of {each} bytes "
                                     "(config parameter max_element_bytes)")
                total += len(x)
        if total > cap:
            raise InputError(f"the request's images total {total} bytes, over the limit of {cap} bytes (config "
                             "parameter max_request_bytes); send smaller images (e.g. JPEG at the size you need)")

    def scalar(self, request, name: str, default, cast=float):
        a = self.array(request, name)
        if a is None:
            return default
        if a.size != 1:
            raise InputError(f"{name} must hold one value, got shape {list(a.shape)}")
        v = a.reshape(-1)[0]
        return cast(v.decode() if isinstance(v, bytes) else v)

    # ---- outputs ----
    def respond(self, outputs: dict[str, np.ndarray]):
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()])

    def error(self, exc: Exception, request=None):
        """The error response for one request: CANCELLED for a cancelled one; INVALID_ARG for a client mistake
        (the message names the input and the fix); a called model's own code for its errors; INTERNAL with a
        request id for our own faults (the traceback goes to the server log under that id, never to the client)."""
        from runtime.serving.logic import Cancelled

        E = self.pb.TritonError
        if isinstance(exc, Cancelled):
            return self.pb.InferenceResponse(error=E(str(exc), E.CANCELLED))
        if isinstance(exc, CalleeError):
            return self.pb.InferenceResponse(error=E(str(exc), exc.code))
        if isinstance(exc, StoryMakerError):
            return self.pb.InferenceResponse(error=E(INVALID + str(exc), E.INVALID_ARG))
        rid = _request_id(request)
        log.exception("internal error in request %s", rid)
        return self.pb.InferenceResponse(error=E(f"internal error (request {rid}): {type(exc).__name__}; the server "
                                                 "log has the details under this id", E.INTERNAL))

    def run_each(self, requests, fn) -> list:
        """One response per request; a failing request never affects the others."""
        responses = []
        for r in requests:
            try:
                responses.append(self.respond(fn(r)))
            except Exception as e:  # noqa: BLE001 - every error becomes this request's error response
                responses.append(self.error(e, r))
        return responses

    # ---- BLS ----
    def bls(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        req = self.pb.InferenceRequest(model_name=model, requested_output_names=outputs,
                                       inputs=[self.pb.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()])
        resp = req.exec()
        if resp.has_error():
            err = resp.error()
            raise CalleeError(model, err.message(), err.code() if hasattr(err, "code") else None, self.pb)
        return {k: self.pb.get_output_tensor_by_name(resp, k).as_numpy() for k in outputs}

    def engine(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str], batched: bool = False):
        """BLS call to an engine model. In a dynamically batched model (unet, controlnet) a per-sample (N,)
        vector is declared [1] per request, so it travels as [N, 1]; Triton's reshape hands it back as (N,)."""
        if batched:
            feeds = {k: v.reshape(-1, 1) if v.ndim == 1 else v for k, v in feeds.items()}
        return self.bls(model, feeds, outputs)




def _request_id(request) -> str:
    import uuid

    try:
        rid = request.request_id() if request is not None else ""
    except Exception:  # noqa: BLE001 - older stubs
        rid = ""
    return rid or uuid.uuid4().hex[:12]


def character_request(glue: Glue, r):
    """PHOTOS, MASKS [n] BYTES; optional CLOTHS, FACE_INFO [n] BYTES (empty element = none), MASK_CHANNELS [n]
    INT32, IDENTITY_ONLY BOOL, INTERPOLATION FP32 -> runtime.serving.logic.CharacterRequest."""
    from runtime.serving.logic import CharacterRequest

    photos, masks = glue.blobs(r, "PHOTOS", True), glue.blobs(r, "MASKS", True)
    n = len(photos)
    cloths = glue.blobs(r, "CLOTHS") or [b""] * n
    faces = glue.texts(r, "FACE_INFO") or [""] * n
    ch = glue.array(r, "MASK_CHANNELS")
    channels = [int(c) for c in ch.reshape(-1)] if ch is not None else [0] * n
    if not (len(cloths) == len(faces) == len(channels) == n):
        raise InputError(f"{n} photos: CLOTHS, FACE_INFO and MASK_CHANNELS need one entry per photo")
    interp = glue.scalar(r, "INTERPOLATION", None)
    return CharacterRequest(photos, masks, [c or None for c in cloths], [f or None for f in faces], channels,
                            bool(glue.scalar(r, "IDENTITY_ONLY", False, bool)), interp)


def generate_options(glue: Glue, r, prompt: str = "(embeddings given)", build=None):
    """Sampling options of a request: every input of contract.SAMPLING that sets a GenerateOptions field, its
    default where the request leaves it out (validated later against the build). A missing WIDTH/HEIGHT takes
    the release's 960x1280 where the build's engines accept it, else the engines' optimal size."""
    from runtime.pipeline import GenerateOptions
    from runtime.preprocess import decode_image
    from runtime.serving.contract import NUMPY, SAMPLING

    cast = lambda p: int if NUMPY[p.dtype].startswith("int") else float
    defaults = {p.option: p.default for p in SAMPLING if p.option}
    if build is not None:
        lo, opt, hi = build.size_range
        if not (lo <= defaults["width"] <= hi and lo <= defaults["height"] <= hi):
            defaults["width"] = defaults["height"] = opt
    values = {p.option: glue.scalar(r, p.name, defaults[p.option], cast(p)) for p in SAMPLING if p.option}
    pose = glue.blobs(r, "POSE")
    return GenerateOptions(prompt=prompt, pose_image=decode_image(pose[0], "pose map") if pose and pose[0] else None,
                           **values)


class Sampling:
    """What a BLS model running the denoising loop needs from a build: the typed manifest, the UniPC plans
    per step count, and EngineDenoisers whose `unet` (and `controlnet`) calls go through one StepBatcher
    (runtime/serving/batcher.py): the loops of all requests in flight share each UNet execution, one BLS call per
    step for all of them, up to the engine profile's batch limit."""

    def __init__(self, glue: Glue, build_dir: str, send_zero_residuals: str | bool = False, max_wait_ms: float = 10.0,
                 engines: str = "bls"):
        import torch

        from runtime.serving.batcher import StepBatcher
        from runtime.serving.engines import Build

        if engines not in ("bls", "inprocess"):
            raise ValueError(f"config parameter denoise_engines={engines!r}: use bls or inprocess")
        self.glue, self.build = glue, Build(build_dir)
        self.send_zero_residuals = str(send_zero_residuals).lower() == "true"
        self.dim, self.plans = self.build.cross_attention_dim, {}
        names = ["unet"] + (["controlnet"] if self.build.has("controlnet") else [])
        self.device = None
        if engines == "inprocess":           # this process runs the sessions with I/O binding: nothing per step leaves it
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
        self.batcher = StepBatcher(fns, {n: self.build.component(n).spec.max_batch() for n in names}, max_wait_ms / 1000.0)

    def denoiser(self):
        from runtime.denoise import EngineDenoiser

        b = self.batcher
        return EngineDenoiser(self.build.component("unet"), b.fn("unet"),
                              b.fn("controlnet") if "controlnet" in b.fns else None,
                              self.build.text_len, self.send_zero_residuals, self.device)

    def latents(self, opts, text, tokens, is_cancelled, on_step=None):
        from runtime.serving.logic import generate_latents

        with self.batcher.loop():
            return generate_latents(opts, text, tokens, self.denoiser(), self.build, self.plans, is_cancelled, on_step)


def text_engine_fns(glue: Glue, build) -> dict:
    """runtime.serving.logic.TextEncoding's encoders as BLS calls to the engine models `text_encoder_1` (the
    component text_encoder) and `text_encoder_2`."""
    outs = {n: build.component(n).output_names for n in ("text_encoder", "text_encoder_2")}
    return {"text_encoder": lambda f: glue.engine("text_encoder_1", f, outs["text_encoder"]),
            "text_encoder_2": lambda f: glue.engine("text_encoder_2", f, outs["text_encoder_2"])}


def _host(x) -> np.ndarray:
    """float32 contiguous numpy on the host, from numpy or a torch tensor on any device."""
    import torch

    return np.ascontiguousarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x, np.float32)


class StageMetrics:
    """Per-stage time of every request as Triton custom metrics on the metrics port (Python backend metrics API):
    `storymaker_stage_seconds_total{model, stage}` (seconds spent) and `storymaker_stage_count_total{model,
    stage}` (times run), so an operator sees where requests spend their time (rate(seconds)/rate(count) is the
    mean per stage). A no-op where the stub has no metrics API."""

    def __init__(self, pb, model: str):
        import threading

        self.model, self.seconds, self.count, self.series = model, None, None, {}
        # one metrics call at a time: tritonserver 2.51's Python backend crashes (SIGSEGV, measured) when request
        # threads create or increment metrics concurrently
        self.lock = threading.Lock()
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
        """Increment one series of each family (created on first use), one metrics call at a time."""
        key = tuple(label.items())
        with self.lock:
            if key not in self.series:
                labels = {"model": self.model, **label}
                self.series[key] = tuple(f.Metric(labels=labels) for f in families)
            for metric, amount in zip(self.series[key], amounts):
                metric.increment(amount)

    def stage(self, name: str):
        import contextlib
        import time

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

    import runtime.denoise  # noqa: F401
    import runtime.pipeline  # noqa: F401
    import runtime.preprocess  # noqa: F401
    import runtime.serving.logic  # noqa: F401


class SamplingModel:
    """Base of the Triton BLS models that run the denoising loop (`sampler`, `storymaker`, `storymaker_stream`):
    their model.py sets `pb` (triton_python_backend_utils, importable only inside the stub) and defines
    `_one(request) -> outputs` (or overrides `_answer`).

    One instance serves many requests at once: `execute` hands each request to a thread of a pool of
    `max_inflight` (config parameter) and returns; the thread answers through the request's response sender
    (Triton's default mode allows that; decoupled models send several responses). The loops of those threads
    share the UNet's executions through `Sampling.batcher`. Requests beyond `max_inflight` wait for a thread."""

    pb = None

    def initialize(self, args):
        from concurrent.futures import ThreadPoolExecutor

        _, params = setup(args)
        self.glue = Glue(self.pb, params)
        self.s = Sampling(self.glue, params["build_dir"], params.get("send_zero_residuals", "false"),
                          float(params.get("step_batch_wait_ms", 10.0)), params.get("denoise_engines", "bls"))
        self.metrics = StageMetrics(self.pb, params.get("component", "storymaker"))
        self.s.batcher.on_execution = self.metrics.execution
        self.pool = ThreadPoolExecutor(int(params.get("max_inflight", 16)), thread_name_prefix="request")
        _import_before_threads()

    def execute(self, requests):
        for r in requests:
            self.pool.submit(self._answer, r, r.get_response_sender())
        return None

    def _answer(self, r, sender):
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
        self.pool.shutdown(wait=True, cancel_futures=True)
