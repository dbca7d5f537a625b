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
    """Sampling options of a request (defaults: the release's), validated later against the engine profile."""
    from runtime.pipeline import GenerateOptions
    from runtime.preprocess import decode_image

    pose = glue.blobs(r, "POSE")
    return GenerateOptions(
        prompt=prompt, steps=glue.scalar(r, "STEPS", 25, int), guidance=glue.scalar(r, "GUIDANCE", 7.5),
        width=glue.scalar(r, "WIDTH", 1280, int), height=glue.scalar(r, "HEIGHT", 960, int),
        seed=glue.scalar(r, "SEED", 0, int), ip_scale=glue.scalar(r, "IP_SCALE", 0.8),
        pose_image=decode_image(pose[0], "pose map") if pose and pose[0] else None,
        controlnet_scale=glue.scalar(r, "CONTROLNET_SCALE", 1.0))


class Sampling:
    """What a BLS model running the UniPC loop needs from a build: the unet record, the scheduler
    config, the token width and a factory of denoisers that call `unet` (and `controlnet`) via BLS."""

    def __init__(self, glue: Glue, build_dir: str):
        from runtime.serving.engines import Build

        b = Build(build_dir)
        self.glue, self.unet = glue, b.manifest["components"]["unet"]
        self.dim = self.unet["spec"]["inputs"][2]["dims"][2]
        self.scheduler = json.loads((b.path / b.manifest["assets"]["scheduler_config"]).read_text())
        outs = [t["name"] for t in b.manifest["components"]["controlnet"]["outputs"]] if b.has("controlnet") else None
        self.controlnet = (lambda f: glue.engine("controlnet", f, outs, batched=True)) if outs else None

    def denoiser(self):
        from runtime.serving.logic import EngineDenoiser

        return EngineDenoiser(self.unet, lambda f: self.glue.engine("unet", f, ["noise_pred"], batched=True),
                              self.controlnet)
