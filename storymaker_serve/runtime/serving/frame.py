"""The frame models: `storymaker` (one response per request) and `storymaker_stream` (decoupled: previews, then
the frame), sharing one frame computation.

`FrameModel._frame(request, on_step)` is the whole frame: prompt budget, options, character tokens (given, or
computed through `encode_characters` after the request budget), the text encoders (tokenisers here, the engines
via BLS or in process), the UniPC loop on the build's engines (cancellation checked before a step, at most
every 10 ms) and `vae_decoder`. `on_step(i, n, x0)` sees the loop's x0 prediction after each step.

Previews (`storymaker_stream`, Triton's decoupled mode over gRPC streaming): every `PREVIEW_EVERY` steps the
model sends the current x0 prediction as a low-resolution RGB image (one pixel per latent, a linear map from
latent channels to RGB), then the final frame with `FINAL` true, exactly the frame `storymaker` returns for the
same request. The linear map is fitted once per model instance from the build's own `vae_decoder` (least
squares of the 8x8-pooled decoded RGB on the latent channels, over seeded random latents), so it matches
whatever VAE the build has; it is an approximation for watching a frame form, not a decode. A client that
cancels the stream stops the loop before its next step.
"""
from __future__ import annotations

import io
import threading

import numpy as np
import torch
from PIL import Image

from storymaker_serve.runtime.denoise import decode
from storymaker_serve.runtime.serving.logic import TextEncoding
from storymaker_serve.runtime.serving.request import FrameRequest, check_tokens, frame_request
from storymaker_serve.runtime.serving.sampling import SamplingModel


class LatentPreview:
    """x0 latents [1, C, h, w] -> uint8 RGB [h, w, 3] through a linear map fitted to a VAE decoder."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        self.weight, self.bias = weight, bias                 # (C, 3), (3,)

    @classmethod
    def fit(cls, vae01, channels: int, size: tuple[int, int], factor: int, draws: int = 2, seed: int = 0):
        """vae01(latents [1, C, h, w] float32) -> image [1, 3, fh, fw] in [0, 1]."""
        rng = np.random.default_rng(seed)
        xs, ys = [], []
        for _ in range(draws):
            lat = rng.standard_normal((1, channels, *size)).astype(np.float32)
            img = vae01(lat)
            img = np.asarray(img.cpu() if torch.is_tensor(img) else img, dtype=np.float64)[0]     # (3, fh, fw)
            h, w = size
            pooled = img.reshape(3, h, factor, w, factor).mean(axis=(2, 4))      # one RGB value per latent pixel
            xs.append(lat[0].reshape(channels, -1).T)
            ys.append(pooled.reshape(3, -1).T)
        x, y = np.concatenate(xs), np.concatenate(ys)
        a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        return cls(coef[:-1].astype(np.float32), coef[-1].astype(np.float32))

    def __call__(self, x0: torch.Tensor) -> np.ndarray:
        lat = x0[0].float().cpu().numpy()                                        # (C, h, w)
        rgb = np.einsum("chw,cr->hwr", lat, self.weight) + self.bias
        return (np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class FrameModel(SamplingModel):
    """Base of `storymaker` and `storymaker_stream` (their model.py set `pb`). A frame, top to bottom:
    request -> characters -> text -> loop -> decode -> response."""

    stream = False                          # the stream model also reads PREVIEW_EVERY
    _text_lock = threading.Lock()
    _text = None

    def _frame(self, r, on_step=None, req: FrameRequest | None = None) -> dict:
        # every input parsed and checked, once
        req = req or frame_request(self.glue, r, self.sampling.build, self.stream)
        stage = self.metrics.stage                                 # per-stage time, on the metrics port
        with stage("characters"):
            tokens = req.tokens or self.encode_characters(req.character_inputs)
        with stage("text"):
            text, truncated = self.text_encoding()(req.prompt, req.negative_prompt)
        with stage("denoise"):
            latents = self.sampling.latents(req.options, text, tokens, r.is_cancelled, on_step=on_step)
        with stage("vae"):
            image = decode(self.sampling.vae01, latents)
        png = b""
        if req.encode_png:
            with stage("png"):
                png = encode_png(image)
        return {"IMAGE": image, "PNG": np.array([png], dtype=object), "TRUNCATED": np.array([truncated])}

    def encode_characters(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The `encode_characters` model's tokens for the request's character inputs (already within budget)."""
        out = self.glue.bls("encode_characters", inputs, ["IMAGE_TOKENS", "NEG_IMAGE_TOKENS"])
        pos, neg = out["IMAGE_TOKENS"], out["NEG_IMAGE_TOKENS"]
        check_tokens(pos, neg, self.sampling.dim)
        return pos, neg

    def text_encoding(self) -> TextEncoding:
        """Tokenisers here, the text encoders as the engine models via BLS (`denoise_engines=bls`) or as sessions in
        this process (`inprocess`): one hop less than calling the `text_encoder` model. Made on first use."""
        with self._text_lock:
            if self._text is None:
                self._text = TextEncoding(self.sampling.build, self.sampling.text_fns)
            return self._text


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class StreamModel(FrameModel):
    """Decoupled: previews every PREVIEW_EVERY steps, then the frame (FINAL true); errors end the stream."""

    stream = True

    _preview_lock = threading.Lock()                  # the first streams of an instance fit it once
    _preview: LatentPreview | None = None

    def preview(self) -> LatentPreview:
        with self._preview_lock:
            if self._preview is None:
                build = self.sampling.build
                lo = build.component("vae_decoder").profile["latent"]["min"]   # the smallest decode the engine takes
                self._preview = LatentPreview.fit(self.sampling.vae01, build.latent_channels, (lo[2], lo[3]),
                                                  build.vae_factor)
            return self._preview

    def _respond(self, r, sender):
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            req = frame_request(self.glue, r, self.sampling.build, stream=True)
            every = req.preview_every
            preview, done = (self.preview() if every else None), [0]

            def on_step(i, n, x0):
                done[0] = i + 1
                if every and (i + 1) % every == 0 and i + 1 < n:
                    sender.send(self.glue.respond({"IMAGE": preview(x0), "STEPS_DONE": np.array([i + 1], np.int32),
                                                   "FINAL": np.array([False])}))

            out = self._frame(r, on_step, req)
            with self.metrics.stage("respond"):
                sender.send(self.glue.respond({**out, "STEPS_DONE": np.array([done[0]], np.int32),
                                               "FINAL": np.array([True])}), flags=final)
        except Exception as e:  # noqa: BLE001 - this request's stream ends with its error
            try:
                sender.send(self.glue.error(e, r), flags=final)
            except Exception:  # noqa: BLE001 - the client is gone (cancelled stream): nothing to tell
                pass
