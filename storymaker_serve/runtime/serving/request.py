"""Served requests as typed values, parsed and checked once.

Every rule about what a request may hold lives here: byte budgets (checked from the inputs' sizes before anything
is decoded or forwarded), the character count, the sampling options against the build (profile sizes, step
limit, and GenerateOptions' own rules), the shapes of given tokens and embeddings, and the stream's preview
interval. The served models read a `FrameRequest`, `SamplerRequest` or `CharacterRequest` and never touch raw
inputs; a bad input raises `InputError` naming the input and the fix, which the glue turns into INVALID_ARGUMENT
for that request only. Inputs and their defaults are declared in runtime/serving/contract.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.pipeline import GenerateOptions, TextEmbeds
from storymaker_serve.runtime.preprocess import decode_image
from storymaker_serve.runtime.serving.contract import CHARACTERS, IMAGE_INPUTS, NUMPY, SAMPLING

MAX_STEPS = 200
DEFAULT_PREVIEW_EVERY = 5
CHARACTER_INPUTS = tuple(p.name for p in CHARACTERS)


@dataclass
class CharacterRequest:
    photos: list[bytes]
    masks: list[bytes]
    cloths: list[bytes | None]
    faces: list[str | None]            # face-info JSON text, or None: detect
    mask_channels: list[int]
    identity_only: bool = False
    interpolation: float | None = None


@dataclass
class FrameRequest:
    """One frame: text, sampling options checked against the build, and the characters as given tokens or as
    the encoded inputs to forward to `encode_characters`."""

    prompt: str
    negative_prompt: str | None
    options: GenerateOptions
    tokens: tuple[np.ndarray, np.ndarray] | None
    character_inputs: dict[str, np.ndarray] | None
    encode_png: bool = True
    preview_every: int = DEFAULT_PREVIEW_EVERY


@dataclass
class SamplerRequest:
    """The `sampler` model's request: given text embeddings and image tokens, and the sampling options."""

    options: GenerateOptions
    text: TextEmbeds
    tokens: tuple[np.ndarray, np.ndarray]


# ---- budgets ----
def prompt(glue, r, name: str = "PROMPT", required: bool = True) -> str | None:
    """A prompt within the byte budget, checked before it is decoded or tokenised."""
    texts = glue.texts(r, name, required, glue.limits["max_prompt_bytes"])
    return texts[0] if texts else None


def check_request_budget(glue, r, max_characters: int) -> None:
    """Before anything is decoded or forwarded: the character count first, then every element's size and the
    total size of the images (PHOTOS, MASKS, CLOTHS, FACE_INFO, POSE)."""
    photos = glue.array(r, "PHOTOS")
    if photos is not None and not 1 <= photos.size <= max_characters:
        raise InputError(f"{photos.size} characters given; this deployment supports 1 to {max_characters} per image")
    total, cap, each = 0, glue.limits["max_request_bytes"], glue.limits["max_element_bytes"]
    for name in IMAGE_INPUTS:
        a = glue.array(r, name)
        for x in (() if a is None else a.reshape(-1)):
            if len(x) > each:
                raise InputError(f"{name}: an element of {len(x)} bytes exceeds the limit of {each} bytes "
                                 "(config parameter max_element_bytes)")
            total += len(x)
    if total > cap:
        raise InputError(f"the request's images total {total} bytes, over the limit of {cap} bytes (config "
                         "parameter max_request_bytes); send smaller images (e.g. JPEG at the size you need)")


# ---- options, tokens, embeddings ----
def generate_options(glue, r, prompt_text: str, build) -> GenerateOptions:
    """Sampling options of a request, checked against the build: every input of contract.SAMPLING that sets a
    GenerateOptions field, else the build's sampling defaults (a few-step LoRA's scheduler, steps, guidance), else
    the contract's. A missing WIDTH/HEIGHT takes the release's 960x1280 where the build's engines accept it, else
    the engines' optimal size."""
    cast = lambda p: str if p.dtype == "BYTES" else int if NUMPY[p.dtype].startswith("int") else float
    defaults = {**{p.option: p.default for p in SAMPLING if p.option}, **build.sampling_defaults}
    lo, opt, hi = build.size_range
    if not (lo <= defaults["width"] <= hi and lo <= defaults["height"] <= hi):
        defaults["width"] = defaults["height"] = opt
    values = {p.option: glue.scalar(r, p.name, defaults[p.option], cast(p)) for p in SAMPLING if p.option}
    pose = glue.blobs(r, "POSE")
    opts = GenerateOptions(prompt=prompt_text, **values,
                           pose_image=decode_image(pose[0], "pose map") if pose and pose[0] else None)
    validate_options(opts, build)
    return opts


def validate_options(opts: GenerateOptions, build) -> None:
    """GenerateOptions' own rules, then the build's: the step limit and the engine profile's sizes."""
    opts.validate(build.vae_factor)
    if opts.steps > MAX_STEPS:
        raise InputError(f"steps={opts.steps} exceeds the server limit of {MAX_STEPS}")
    lo, _, hi = build.size_range
    for k in ("width", "height"):
        v = getattr(opts, k)
        if not lo <= v <= hi:
            raise InputError(f"{k}={v} is outside this engine's profile ({lo}..{hi} px); use a size in range or "
                             "rebuild with --min-size/--max-size")


def check_tokens(pos: np.ndarray, neg: np.ndarray, d: int) -> None:
    for name, t in (("IMAGE_TOKENS", pos), ("NEG_IMAGE_TOKENS", neg)):
        if t.ndim != 3 or t.shape[0] != 1 or t.shape[2] != d or t.shape[1] % 20 or not 40 <= t.shape[1] <= 80:
            raise InputError(f"{name} must be [1, 20(n+1), {d}] for 1-3 characters, got {list(t.shape)}")
        if not np.isfinite(t).all():
            raise InputError(f"{name} contains NaN or infinite values")
    if pos.shape != neg.shape:
        raise InputError(f"IMAGE_TOKENS {list(pos.shape)} and NEG_IMAGE_TOKENS {list(neg.shape)} differ")


def check_text(embeds: np.ndarray, pooled: np.ndarray, build) -> None:
    """Given text embeddings (the sampler's inputs): [2, L, D] and [2, P], finite."""
    want = {"PROMPT_EMBEDS": (2, build.text_len, build.cross_attention_dim), "POOLED": (2, build.pooled_dim)}
    for name, t in (("PROMPT_EMBEDS", embeds), ("POOLED", pooled)):
        if tuple(t.shape) != want[name]:
            raise InputError(f"{name} must be {list(want[name])} ([negative, positive], from text_encoder), "
                             f"got {list(t.shape)}")
        if not np.isfinite(t).all():
            raise InputError(f"{name} contains NaN or infinite values")


# ---- the requests ----
def frame_request(glue, r, build, stream: bool = False) -> FrameRequest:
    """`storymaker` / `storymaker_stream`: budgets before anything is decoded, then text, options, characters."""
    text = prompt(glue, r)
    negative = prompt(glue, r, "NEGATIVE_PROMPT", required=False)
    check_request_budget(glue, r, build.max_characters)
    opts = generate_options(glue, r, text, build)
    pos, neg = glue.array(r, "IMAGE_TOKENS"), glue.array(r, "NEG_IMAGE_TOKENS")
    tokens = forward = None
    if pos is not None and neg is not None:
        check_tokens(pos, neg, build.cross_attention_dim)
        tokens = (pos, neg)
    elif glue.array(r, "PHOTOS") is not None:
        forward = {k: v for k in CHARACTER_INPUTS if (v := glue.array(r, k)) is not None}
    else:
        raise InputError("give IMAGE_TOKENS + NEG_IMAGE_TOKENS (from encode_characters) or PHOTOS + MASKS")
    every = glue.scalar(r, "PREVIEW_EVERY", DEFAULT_PREVIEW_EVERY, int) if stream else 0
    if every < 0:
        raise InputError(f"PREVIEW_EVERY={every}: give 0 (no previews) or a step interval >= 1")
    return FrameRequest(text, negative, opts, tokens, forward, bool(glue.scalar(r, "ENCODE_PNG", True, bool)), every)


def sampler_request(glue, r, build) -> SamplerRequest:
    opts = generate_options(glue, r, "(embeddings given)", build)
    tokens = (glue.array(r, "IMAGE_TOKENS", True), glue.array(r, "NEG_IMAGE_TOKENS", True))
    check_tokens(*tokens, build.cross_attention_dim)
    embeds, pooled = glue.array(r, "PROMPT_EMBEDS", True), glue.array(r, "POOLED", True)
    check_text(embeds, pooled, build)                      # the checks the frame models' own text gets
    return SamplerRequest(opts, TextEmbeds(torch.from_numpy(embeds), torch.from_numpy(pooled)), tokens)


def character_request(glue, r, max_characters: int) -> CharacterRequest:
    """PHOTOS, MASKS [n] BYTES; optional CLOTHS, FACE_INFO [n] BYTES (empty element = none), MASK_CHANNELS [n]
    INT32, IDENTITY_ONLY BOOL, INTERPOLATION FP32, after the budgets."""
    check_request_budget(glue, r, max_characters)
    photos, masks = glue.blobs(r, "PHOTOS", True), glue.blobs(r, "MASKS", True)
    n = len(photos)
    cloths = glue.blobs(r, "CLOTHS") or [b""] * n
    faces = glue.texts(r, "FACE_INFO") or [""] * n
    ch = glue.array(r, "MASK_CHANNELS")
    channels = [int(c) for c in ch.reshape(-1)] if ch is not None else [0] * n
    if not (len(cloths) == len(faces) == len(channels) == n):
        raise InputError(f"{n} photos: CLOTHS, FACE_INFO and MASK_CHANNELS need one entry per photo")
    interp = glue.scalar(r, "INTERPOLATION", None)
    if interp is not None and not (np.isfinite(interp) and 0.0 <= interp <= 1.0):
        raise InputError(f"INTERPOLATION={interp}: give a weight from 0 (character 1) to 1 (character 2)")
    if interp is not None and n != 2:
        raise InputError(f"INTERPOLATION blends two characters; {n} given")
    return CharacterRequest(photos, masks, [c or None for c in cloths], [f or None for f in faces], channels,
                            bool(glue.scalar(r, "IDENTITY_ONLY", False, bool)), interp)
