"""Helpers shared by the Triton Python-backend models; `pb_utils` is passed in, never imported here.

Every model.py in triton_repo/ is thin: it parses its config once, then hands
each request to a function from runtime/ through `Glue.run_each`, which turns
`InputError`/`WeightsError` into an INVALID_ARG error for that request only,
`Cancelled` into CANCELLED, and anything else into INTERNAL with a short
message (the traceback goes to the server log, never to the client). `Glue.bls`
calls another model of the repository (BLS) and raises `InputError` with the
callee's message when it rejects the request.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

from runtime.errors import InputError, StoryMakerError

log = logging.getLogger("storymaker.triton")
MAX_BYTES_INPUT = 32 << 20      # per BYTES element (an encoded image); decoded pixels are capped separately


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
    def __init__(self, pb):
        self.pb = pb

    # ---- inputs ----
    def array(self, request, name: str, required: bool = False):
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:
            if required:
                raise InputError(f"missing required input {name}")
            return None
        return t.as_numpy()

    def texts(self, request, name: str, required: bool = False) -> list[str] | None:
        raw = self.blobs(request, name, required)
        if raw is None:
            return None
        try:
            return [b.decode("utf-8") for b in raw]
        except UnicodeDecodeError:
            raise InputError(f"{name} must be UTF-8 text") from None

    def blobs(self, request, name: str, required: bool = False) -> list[bytes] | None:
        a = self.array(request, name, required)
        if a is None:
            return None
        out = [bytes(x) for x in a.reshape(-1)]
        for b in out:
            if len(b) > MAX_BYTES_INPUT:
                raise InputError(f"{name}: an element of {len(b)} bytes exceeds the limit of {MAX_BYTES_INPUT}")
        return out

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

    def error(self, exc: Exception):
        from runtime.serving.logic import Cancelled

        E = self.pb.TritonError
        if isinstance(exc, Cancelled):
            return self.pb.InferenceResponse(error=E(str(exc), E.CANCELLED))
        if isinstance(exc, StoryMakerError):
            return self.pb.InferenceResponse(error=E(str(exc), E.INVALID_ARG))
        log.exception("internal error")
        return self.pb.InferenceResponse(error=E(f"internal error: {type(exc).__name__}: {str(exc)[:200]}", E.INTERNAL))

    def run_each(self, requests, fn) -> list:
        """One response per request; a failing request never affects the others."""
        responses = []
        for r in requests:
            try:
                responses.append(self.respond(fn(r)))
            except Exception as e:  # noqa: BLE001 - every error becomes this request's error response
                responses.append(self.error(e))
        return responses

    # ---- BLS ----
    def bls(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        req = self.pb.InferenceRequest(model_name=model, requested_output_names=outputs,
                                       inputs=[self.pb.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()])
        resp = req.exec()
        if resp.has_error():
            raise InputError(f"{model}: {resp.error().message()}")
        return {k: self.pb.get_output_tensor_by_name(resp, k).as_numpy() for k in outputs}

    def engine(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str], batched: bool = False):
        """BLS call to an engine model. In a dynamically batched model (unet, controlnet) a per-sample (N,)
        vector is declared [1] per request, so it travels as [N, 1]; Triton's reshape hands it back as (N,)."""
        if batched:
            feeds = {k: v.reshape(-1, 1) if v.ndim == 1 else v for k, v in feeds.items()}
        return self.bls(model, feeds, outputs)




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


def generate_options(glue: Glue, r, prompt: str = "(embeddings given)"):
    """Sampling options of a request: every input of contract.SAMPLING that sets a GenerateOptions field, its
    default where the request leaves it out (validated later against the build)."""
    from runtime.pipeline import GenerateOptions
    from runtime.preprocess import decode_image
    from runtime.serving.contract import NUMPY, SAMPLING

    cast = lambda p: int if NUMPY[p.dtype].startswith("int") else float
    values = {p.option: glue.scalar(r, p.name, p.default, cast(p)) for p in SAMPLING if p.option}
    pose = glue.blobs(r, "POSE")
    return GenerateOptions(prompt=prompt, pose_image=decode_image(pose[0], "pose map") if pose and pose[0] else None,
                           **values)


class Sampling:
    """What a BLS model running the denoising loop needs from a build: the typed manifest, the UniPC plans
    per step count, and a factory of EngineDenoisers that call `unet` (and `controlnet`) via BLS."""

    def __init__(self, glue: Glue, build_dir: str):
        from runtime.manifest import Manifest

        self.glue, self.build = glue, Manifest(build_dir)
        self.dim, self.plans = self.build.cross_attention_dim, {}
        outs = self.build.component("controlnet").output_names if self.build.has("controlnet") else None
        self.controlnet = (lambda f: glue.engine("controlnet", f, outs, batched=True)) if outs else None

    def denoiser(self):
        from runtime.denoise import EngineDenoiser

        return EngineDenoiser(self.build.component("unet"),
                              lambda f: self.glue.engine("unet", f, ["noise_pred"], batched=True), self.controlnet,
                              self.build.text_len)

    def latents(self, opts, text, tokens, is_cancelled):
        from runtime.serving.logic import generate_latents

        return generate_latents(opts, text, tokens, self.denoiser(), self.build, self.plans, is_cancelled)


class SamplingModel:
    """Base of the Triton BLS models that run the denoising loop (`sampler`, `storymaker`): their model.py sets
    `pb` (triton_python_backend_utils, importable only inside the stub) and defines `_one(request) -> outputs`."""

    pb = None

    def initialize(self, args):
        _, params = setup(args)
        self.glue = Glue(self.pb)
        self.s = Sampling(self.glue, params["build_dir"])

    def execute(self, requests):
        return self.glue.run_each(requests, self._one)
