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
import uuid

import numpy as np

from storymaker_serve.runtime.errors import InputError, StoryMakerError
from storymaker_serve.runtime.serving.contract import LIMITS
from storymaker_serve.runtime.serving.logic import Cancelled

log = logging.getLogger("storymaker.triton")


INVALID = "invalid input: "      # leads every client-mistake message our models send


class CalleeError(Exception):
    """A model called through BLS answered with an error: passed on with the callee's own code. Where the server
    reports every BLS error as INTERNAL (tritonserver 2.51 does), our models' client-mistake messages carry the
    INVALID prefix and cancellations their own wording, which restores the code."""

    def __init__(self, model: str, message: str, code, pb):
        # a client mistake or a cancellation keeps its documented prefix first; other errors name the callee
        super().__init__(message if message.startswith((INVALID, "request cancelled")) else f"{model}: {message}")
        E = pb.TritonError
        if code is None or code == E.INTERNAL:
            code = E.INVALID_ARG if message.startswith(INVALID) else \
                E.CANCELLED if message.startswith("request cancelled") else E.INTERNAL
        self.code = code


def setup(args: dict) -> tuple[dict, dict]:
    """(model config, parameters) from Triton's initialize() args.

    A relative `build_dir` (the NGC repository writes "../..") is resolved against the model's own folder
    (`args["model_repository"]`), so a build folder can be moved or mounted anywhere as a whole."""
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    bd = params.get("build_dir")
    if bd and not os.path.isabs(bd):
        params["build_dir"] = os.path.normpath(os.path.join(args["model_repository"], bd))
    return cfg, params


class Glue:
    def __init__(self, pb, params: dict | None = None):
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

    def scalar(self, request, name: str, default, cast=float):
        a = self.array(request, name)
        if a is None:
            return default
        if a.size != 1:
            raise InputError(f"{name} must hold one value, got shape {list(a.shape)}")
        v = a.reshape(-1)[0]
        try:
            return cast(v.decode() if isinstance(v, bytes) else v)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise InputError(f"{name}: {v!r} is not a valid {cast.__name__}") from None

    # ---- outputs ----
    def respond(self, outputs: dict[str, np.ndarray]):
        tensors = [self.pb.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()]
        return self.pb.InferenceResponse(output_tensors=tensors)

    def error(self, exc: Exception, request=None):
        """The error response for one request: CANCELLED for a cancelled one; INVALID_ARG for a client mistake
        (the message names the input and the fix); a called model's own code for its errors; INTERNAL with a
        request id for our own faults (the traceback goes to the server log under that id, never to the client)."""
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
        """Call `model` and return its outputs as numpy arrays, which is what every caller of this consumes: the
        BLS layout's loop, tokens and text are host arrays (the loop that keeps its tensors on the GPU is the
        `inprocess` layout, with no BLS per step). So the outputs are asked for in CPU memory: an engine model on a
        GPU (the NGC repository's TensorRT and onnxruntime models) would otherwise answer in GPU memory, and
        `as_numpy()` refuses that ("Tensor is stored in GPU and cannot be converted to NumPy")."""
        req = self.pb.InferenceRequest(model_name=model, requested_output_names=outputs,
                                       inputs=[self.pb.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
                                       **self._cpu_outputs())
        resp = req.exec()
        if resp.has_error():
            err = resp.error()
            raise CalleeError(model, err.message(), err.code() if hasattr(err, "code") else None, self.pb)
        return {k: self.pb.get_output_tensor_by_name(resp, k).as_numpy() for k in outputs}

    def _cpu_outputs(self) -> dict:
        """InferenceRequest's keyword for outputs in CPU memory (python_backend's `preferred_memory`, Triton 23.05
        and later); empty for a stub too old to have it (they return CPU outputs for CPU models only)."""
        pref = getattr(self.pb, "PreferredMemory", None)
        if pref is None:
            return {}
        return {"preferred_memory": pref(self.pb.TRITONSERVER_MEMORY_CPU, 0)}

    def engine(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str], batched: bool = False):
        """BLS call to an engine model. In a dynamically batched model (unet, controlnet) a per-sample (N,)
        vector is declared [1] per request, so it travels as [N, 1]; Triton's reshape hands it back as (N,)."""
        if batched:
            feeds = {k: v.reshape(-1, 1) if v.ndim == 1 else v for k, v in feeds.items()}
        return self.bls(model, feeds, outputs)




def _request_id(request) -> str:
    try:
        rid = request.request_id() if request is not None else ""
    except Exception:  # noqa: BLE001 - older stubs
        rid = ""
    return rid or uuid.uuid4().hex[:12]


def text_engine_fns(glue: Glue, build) -> dict:
    """runtime.serving.logic.TextEncoding's encoders as BLS calls to the engine models `text_encoder_1` (the
    component text_encoder) and `text_encoder_2`."""
    outs = {n: build.component(n).output_names for n in ("text_encoder", "text_encoder_2")}
    return {"text_encoder": lambda f: glue.engine("text_encoder_1", f, outs["text_encoder"]),
            "text_encoder_2": lambda f: glue.engine("text_encoder_2", f, outs["text_encoder_2"])}
