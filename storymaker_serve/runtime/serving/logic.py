"""Serving logic on exported engines, free of Triton imports (the Triton models are glue around it).

Each class here is what one served model computes, on the ONNX engines of a
build (runtime/serving/engines.py) and the same functions as the in-process pipeline
(tokenisation, preprocessing, and runtime/denoise.py's loop, denoisers and
decode), so the served path and `StoryMakerPipeline` give the same image
for the same seed. Requests are parsed and checked before they get here (runtime/serving/request.py).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import torch
from transformers import CLIPTokenizer

from storymaker_serve.runtime.characters import Character, preprocess_characters
from storymaker_serve.runtime.denoise import EngineDenoiser, denoise, step_inputs
from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.face import FaceAnalyzer, FaceInfo
from storymaker_serve.runtime.pipeline import GenerateOptions, TextEmbeds, tokenize
from storymaker_serve.runtime.schedulers import cached_plan
from storymaker_serve.runtime.serving.request import CharacterRequest, validate_options

# a served request's is_cancelled() is a round trip from the Python backend's stub to the server (measured: with
# stand-in engines at 960x1280, checked every step it was a sixth of the loop's time); checked at most this often, a
# cancelled loop stops within this time or one step, whichever is longer
CANCEL_CHECK_S = 0.010


class TextEncoding:
    """Both SDXL text encoders on ONNX engines: (prompt, negative) -> TextEmbeds, truncated flag.

    Tokenisation runs here; each encoder runs once per request with the prompt and the negative prompt as one
    batch of 2 (its engine profile's batch). `fns` {component: feeds -> outputs} replaces the in-process sessions:
    the served `text_encoder` model passes BLS calls to the engine models `text_encoder_1` / `text_encoder_2`."""

    def __init__(self, build, fns: dict | None = None):
        self.tok = [CLIPTokenizer.from_pretrained(str(build.file(build.assets[k])))
                    for k in ("tokenizer", "tokenizer_2")]
        self.te = [(fns or {}).get(n) or build.engine(n).run for n in ("text_encoder", "text_encoder_2")]
        # the frame models encode on many request threads at once: a tokenizer (tokenizers backend) keeps its padding
        # and truncation settings as state that each call sets, so concurrent calls came back unpadded (measured:
        # input_ids [1, 4] instead of [1, 77] under 8 concurrent requests); one tokenisation at a time
        self._tok_lock = threading.Lock()

    def _encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """[len(prompts), L, D] hidden states of both encoders side by side, [len(prompts), P] pooled, truncated."""
        ids, cut = [], []
        for tok in self.tok:
            with self._tok_lock:
                pairs = [tokenize(tok, p) for p in prompts]
            ids.append(np.concatenate([i for i, _ in pairs]))
            cut.append([t for _, t in pairs])
        h1 = self.te[0]({"input_ids": ids[0]})["hidden_states"]
        out2 = self.te[1]({"input_ids": ids[1]})
        return np.concatenate([h1, out2["hidden_states"]], -1), out2["text_embeds"], [a or b for a, b in zip(*cut)]

    def __call__(self, prompt: str, negative: str | None) -> tuple[TextEmbeds, bool]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt is missing or empty")
        hidden, pooled, truncated = self._encode([prompt] if negative is None else [negative, prompt])
        if negative is None:           # SDXL: no negative prompt means zero embeddings
            hidden = np.concatenate([np.zeros_like(hidden), hidden])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        return TextEmbeds(torch.from_numpy(np.ascontiguousarray(hidden)),
                          torch.from_numpy(np.ascontiguousarray(pooled))), \
            truncated[-1]


class CharacterEncoding:
    """Photos + masks (+ cloth, face info) -> (positive, negative) image tokens via clip_vision and ppr engines."""

    def __init__(self, build, clip_fn=None, ppr_fn=None):
        self.max_chars = build.max_characters
        self.faces = (FaceAnalyzer(build.file(build.component("face_detector").model_file),
                                   build.file(build.component("face_recognizer").model_file))
                      if build.has("face_detector") and build.has("face_recognizer") else None)
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
        feeds = {"id_embeds": ids.astype(np.float32), "clip_embeds": clip, "face_embeds": face,
                 "clip_token_scale": scale}
        pos = self.ppr_fn(feeds)["image_tokens"]
        key = (ids.shape[0], bool(identity_only))
        if key not in self._negatives:
            zeros = {k: np.zeros_like(v) if k != "clip_token_scale" else v for k, v in feeds.items()}
            self._negatives[key] = self.ppr_fn(zeros)["image_tokens"]
        return pos, self._negatives[key]

    def __call__(self, req: CharacterRequest):
        return self.tokens(*self.features(req), req.identity_only, req.interpolation)


class EnginePipeline:
    """The build's engines in process (onnxruntime sessions): what the served models compute, without Triton.
    Same text encoding, character encoding, validation, loop and decode as the BLS models."""

    def __init__(self, build):
        self.b, self.text, self.chars, self.plans = build, TextEncoding(build), CharacterEncoding(build), {}
        cn = build.engine("controlnet").run if build.has("controlnet") else None
        self.denoiser = EngineDenoiser(build.component("unet"), build.engine("unet").run, cn, build.text_len)
        self.vae = build.engine("vae_decoder").run

    def encode_characters(self, req: CharacterRequest):
        return self.chars(req)

    def latents(self, opts: GenerateOptions, tokens, is_cancelled=None) -> torch.Tensor:
        validate_options(opts, self.b)
        text, _ = self.text(opts.prompt, opts.negative_prompt)
        return generate_latents(opts, text, tokens, self.denoiser, self.b, self.plans, is_cancelled)

    def generate(self, opts: GenerateOptions, tokens) -> np.ndarray:
        from storymaker_serve.runtime.denoise import decode, engine_vae01

        return decode(engine_vae01(self.vae), self.latents(opts, tokens))


class Cancelled(Exception):
    """The client cancelled the request; the server stops it and moves on."""


def generate_latents(opts: GenerateOptions, text: TextEmbeds, tokens, denoiser, build, plans: dict | None = None,
                     is_cancelled=None, on_step=None) -> torch.Tensor:
    """runtime.denoise.denoise on the build's engines; `is_cancelled()` is checked before a step once CANCEL_CHECK_S
    has passed since the last check (before every step where a step takes longer, as a UNet step does), `on_step(i, n,
    x0)` sees the x0 prediction after each (previews). `plans` caches the sampler plans (host arithmetic, once
    per scheduler, steps and spacing)."""
    last = [-CANCEL_CHECK_S]

    def check(i, n):
        if is_cancelled is None or time.monotonic() - last[0] < CANCEL_CHECK_S:
            return
        last[0] = time.monotonic()
        if is_cancelled():
            raise Cancelled(f"request cancelled before step {i + 1}/{n}")
    plan = cached_plan({} if plans is None else plans, build.scheduler_config, opts)
    return denoise(denoiser, step_inputs(text, tokens, opts), opts, plan, build.vae_factor,
                   build.latent_channels, device=denoiser.device or "cpu", step_callback=check, on_step=on_step)
