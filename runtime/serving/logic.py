"""Serving logic on exported engines, free of Triton imports (the Triton models are glue around it).

Each class here is what one served model computes, on the ONNX engines of a
build (runtime/serving/engines.py) and the same functions as the in-process pipeline
(tokenisation, preprocessing, `step_inputs`, the UniPC `sample` loop,
`to_uint8`), so the served path and `StoryMakerPipeline` give the same image
for the same seed. Request validation lives here too: every bad input raises
`InputError` with a message for that request only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from runtime.characters import Character, preprocess_characters
from runtime.errors import InputError
from runtime.face import FaceAnalyzer, FaceInfo
from runtime.pipeline import GenerateOptions, TextEmbeds, sample, step_inputs, to_uint8, tokenize
from runtime.shapes import eval_dim

MAX_STEPS = 200


class TextEncoding:
    """Both SDXL text encoders on ONNX engines: (prompt, negative) -> TextEmbeds, truncated flag."""

    def __init__(self, build):
        from transformers import CLIPTokenizer

        a = build.manifest["assets"]
        self.tok = [CLIPTokenizer.from_pretrained(str(build.path / a[k])) for k in ("tokenizer", "tokenizer_2")]
        self.te = [build.engine("text_encoder"), build.engine("text_encoder_2")]

    def _encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray, bool]:
        ids1, t1 = tokenize(self.tok[0], prompt)
        ids2, t2 = tokenize(self.tok[1], prompt)
        h1 = self.te[0].run({"input_ids": ids1})["hidden_states"]
        out2 = self.te[1].run({"input_ids": ids2})
        return np.concatenate([h1, out2["hidden_states"]], -1), out2["text_embeds"], t1 or t2

    def __call__(self, prompt: str, negative: str | None) -> tuple[TextEmbeds, bool]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt is missing or empty")
        pos, pooled, truncated = self._encode(prompt)
        if negative is None:
            neg, npooled = np.zeros_like(pos), np.zeros_like(pooled)
        else:
            neg, npooled, _ = self._encode(negative)
        return TextEmbeds(torch.from_numpy(np.concatenate([neg, pos])), torch.from_numpy(np.concatenate([npooled, pooled]))), truncated


@dataclass
class CharacterRequest:
    photos: list[bytes]
    masks: list[bytes]
    cloths: list[bytes | None]
    faces: list[str | None]            # face-info JSON text, or None: detect
    mask_channels: list[int]
    identity_only: bool = False
    interpolation: float | None = None


class CharacterEncoding:
    """Photos + masks (+ cloth, face info) -> (positive, negative) image tokens via clip_vision and ppr engines."""

    def __init__(self, build, clip_fn=None, ppr_fn=None):
        c = build.manifest["components"]
        self.max_chars = c["ppr"]["spec"]["symbols"]["n"][2]
        self.faces = (FaceAnalyzer(build.path / c["face_detector"]["files"][0]["path"],
                                   build.path / c["face_recognizer"]["files"][0]["path"])
                      if "face_detector" in c and "face_recognizer" in c else None)
        self.clip_fn = clip_fn or build.engine("clip_vision").run       # BLS calls when served
        self.ppr_fn = ppr_fn or build.engine("ppr").run
        self._negatives: dict = {}     # (n, identity_only) -> tokens of all-zero inputs: constant, computed once

    def features(self, req: CharacterRequest) -> tuple[np.ndarray, np.ndarray]:
        n = len(req.photos)
        if not 1 <= n <= self.max_chars:
            raise InputError(f"{n} characters given; this deployment supports 1 to {self.max_chars} per image")
        if not (len(req.masks) == n and len(req.cloths) == n and len(req.faces) == n):
            raise InputError(f"{n} photos but {len(req.masks)} masks: give one mask (and cloth/face entry) per photo")
        chars = []
        for i in range(n):
            face = FaceInfo.from_text(req.faces[i], f"character {i + 1} face info") if req.faces[i] else None
            chars.append(Character.load(req.photos[i], req.masks[i], face, req.cloths[i] or None, f"character {i + 1}",
                                        req.mask_channels[i]))
        ids, char_px, face_px = preprocess_characters(chars, self.faces, self.max_chars)
        hidden = self.clip_fn({"pixel_values": np.concatenate([char_px.numpy(), face_px.numpy()])})["hidden_states"]
        return ids.numpy(), hidden                                         # (n, 512), (2n, 257, C)

    def tokens(self, ids: np.ndarray, hidden: np.ndarray, identity_only=False, interpolation=None):
        n = ids.shape[0]
        clip, face = hidden[:n], hidden[n:]
        if interpolation is not None:
            if n != 2:
                raise InputError(f"interpolation needs exactly 2 characters, got {n}")
            w = float(interpolation)
            ids, clip, face = (((1 - w) * t[0] + w * t[1])[None] for t in (ids, clip, face))
        scale = np.array([0.0 if identity_only else 1.0], np.float32)                # [1], broadcast over tokens
        feeds = {"id_embeds": ids.astype(np.float32), "clip_embeds": clip, "face_embeds": face, "clip_token_scale": scale}
        pos = self.ppr_fn(feeds)["image_tokens"]
        key = (ids.shape[0], bool(identity_only))
        if key not in self._negatives:
            zeros = {k: np.zeros_like(v) if k != "clip_token_scale" else v for k, v in feeds.items()}
            self._negatives[key] = self.ppr_fn(zeros)["image_tokens"]
        return pos, self._negatives[key]

    def __call__(self, req: CharacterRequest):
        return self.tokens(*self.features(req), req.identity_only, req.interpolation)


class EngineDenoiser:
    """eps(x, t) through unet (and controlnet) engines or BLS calls; the same step inputs as TorchDenoiser."""

    def __init__(self, unet_record: dict, unet_fn, controlnet_fn=None):
        self.rec, self.unet_fn, self.controlnet_fn = unet_record, unet_fn, controlnet_fn
        self.res = [t for t in unet_record["inputs"] if t["name"].startswith(("down_res", "mid_res"))]

    def prepare(self, inputs: dict) -> None:
        if inputs["pose"] is not None and self.controlnet_fn is None:
            raise InputError("a pose map was given but this deployment has no controlnet; rebuild with controlnet/")
        self.inp = {k: (v.numpy().astype(np.float32) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        self._zeros: dict = {}         # zero ControlNet residuals per latent shape, allocated once per request
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i, n = self.inp, x.shape[0]
        feeds = {"sample": x.numpy().astype(np.float32), "timestep": np.full((n,), float(t), np.float32),
                 "encoder_hidden_states": i["encoder_hidden_states"], "text_embeds": i["text_embeds"],
                 "time_ids": i["time_ids"], "ip_scale": i["ip_scale"]}
        if i["pose"] is not None:
            cn = {k: feeds[k] for k in ("sample", "timestep", "text_embeds", "time_ids")}
            cn.update(encoder_hidden_states=i["encoder_hidden_states"][:, :77], controlnet_cond=i["pose"],
                      conditioning_scale=i["controlnet_scale"])
            feeds.update(self.controlnet_fn(cn))
        else:                                   # no pose map: zero residuals (exact: the UNet adds them)
            key = tuple(x.shape)
            if key not in self._zeros:
                vals = {"N": n, "h": x.shape[2], "w": x.shape[3]}
                self._zeros[key] = {r["name"]: np.zeros([eval_dim(d, vals) for d in r["dims"]], np.float32)
                                    for r in self.res}
            feeds.update(self._zeros[key])
        return torch.from_numpy(self.unet_fn(feeds)["noise_pred"])


def validate_options(opts: GenerateOptions, unet_record: dict) -> None:
    """Per-request checks against the engine profile, with messages that say what to change."""
    opts.validate(8)
    if opts.steps > MAX_STEPS:
        raise InputError(f"steps={opts.steps} exceeds the server limit of {MAX_STEPS}")
    lo, hi = unet_record["spec"]["symbols"]["h"][0] * 8, unet_record["spec"]["symbols"]["h"][2] * 8
    for k in ("width", "height"):
        v = getattr(opts, k)
        if not lo <= v <= hi:
            raise InputError(f"{k}={v} is outside this engine's profile ({lo}..{hi} px); use a size in range or "
                             "rebuild with --min-size/--max-size")


def check_tokens(pos: np.ndarray, neg: np.ndarray, d: int) -> None:
    for name, t in (("image_tokens", pos), ("negative_image_tokens", neg)):
        if t.ndim != 3 or t.shape[0] != 1 or t.shape[2] != d or t.shape[1] % 20 or not 40 <= t.shape[1] <= 80:
            raise InputError(f"{name} must be [1, 20(n+1), {d}] for 1-3 characters, got {list(t.shape)}")
        if not np.isfinite(t).all():
            raise InputError(f"{name} contains NaN or infinite values")
    if pos.shape != neg.shape:
        raise InputError(f"image_tokens {list(pos.shape)} and negative_image_tokens {list(neg.shape)} differ")


def generate_latents(opts: GenerateOptions, text: TextEmbeds, tokens, denoiser, scheduler_config: dict,
                     is_cancelled=None) -> torch.Tensor:
    """The shared UniPC loop; `is_cancelled()` is checked before every step."""
    def check(i, n):
        if is_cancelled is not None and is_cancelled():
            raise Cancelled(f"request cancelled before step {i + 1}/{n}")
    tok = tuple(torch.from_numpy(np.asarray(t)) for t in tokens)
    return sample(denoiser, step_inputs(text, tok, opts), opts, scheduler_config, 4, check)


class Cancelled(Exception):
    """The client cancelled the request; the server stops it and moves on."""


def decode_latents(vae_fn, latents: torch.Tensor) -> np.ndarray:
    img = vae_fn({"latent": latents.numpy().astype(np.float32)})["image"]    # (1, 3, H, W) in [0, 1]
    if not math.isfinite(float(img.sum())):
        raise InputError("the VAE produced non-finite pixels (check the embeddings given)")
    return to_uint8(img[0])
