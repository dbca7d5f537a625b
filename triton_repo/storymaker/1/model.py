"""Triton BLS model `storymaker`: one story frame, prompt + characters -> uint8 image and PNG.

Character tokens are either given (IMAGE_TOKENS/NEG_IMAGE_TOKENS from one
`encode_characters` call per story) or computed here from PHOTOS/MASKS (+ CLOTHS,
FACE_INFO, ...) through `encode_characters`. Then `text_encoder`, the UniPC
loop (unet/controlnet via BLS, `request.is_cancelled()` checked before every
step, as runtime.serving.logic.generate_latents) and `vae_decoder`. A BLS model rather
than a static ensemble: its inputs are optional and cancellation must reach
the denoising loop. Outputs IMAGE [H, W, 3] uint8, PNG [1] bytes, TRUNCATED [1].
"""
import storymaker_serve  # noqa: F401,I001  (first: puts runtime/ on sys.path, installed or in a checkout)
import io

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from PIL import Image

from runtime.errors import InputError
from runtime.pipeline import TextEmbeds
from runtime.denoise import decode, engine_vae01
from runtime.serving.logic import check_tokens, validate_options
from runtime.serving.contract import CHARACTERS
from runtime.serving.glue import SamplingModel, generate_options

CHAR_INPUTS = [p.name for p in CHARACTERS]


class TritonPythonModel(SamplingModel):
    pb = pb_utils

    def _tokens(self, r):
        g = self.glue
        pos, neg = g.array(r, "IMAGE_TOKENS"), g.array(r, "NEG_IMAGE_TOKENS")
        if pos is None or neg is None:
            if g.array(r, "PHOTOS") is None:
                raise InputError("give IMAGE_TOKENS + NEG_IMAGE_TOKENS (from encode_characters) or PHOTOS + MASKS")
            g.check_request_budget(r, self.s.build.max_characters)        # before forwarding anything
            fwd = {k: v for k in CHAR_INPUTS if (v := g.array(r, k)) is not None}
            out = g.bls("encode_characters", fwd, ["IMAGE_TOKENS", "NEG_IMAGE_TOKENS"])
            pos, neg = out["IMAGE_TOKENS"], out["NEG_IMAGE_TOKENS"]
        check_tokens(pos, neg, self.s.dim)
        return pos, neg

    def _one(self, r):
        g = self.glue
        prompt = g.prompt(r)                                          # byte budget before anything else
        neg = g.prompt(r, "NEGATIVE_PROMPT", required=False)
        opts = generate_options(g, r, prompt, self.s.build)
        validate_options(opts, self.s.build)
        stage = self.metrics.stage                                    # per-stage time, on the metrics port
        with stage("characters"):
            tokens = self._tokens(r)
        te_in = {"PROMPT": np.array([prompt.encode()], dtype=object)}
        if neg is not None:
            te_in["NEGATIVE_PROMPT"] = np.array([neg.encode()], dtype=object)
        with stage("text"):
            te = g.bls("text_encoder", te_in, ["PROMPT_EMBEDS", "POOLED", "TRUNCATED"])
        text = TextEmbeds(torch.from_numpy(te["PROMPT_EMBEDS"]), torch.from_numpy(te["POOLED"]))
        with stage("denoise"):
            lat = self.s.latents(opts, text, tokens, r.is_cancelled)
        with stage("vae"):
            img = decode(engine_vae01(lambda f: g.engine("vae_decoder", f, ["image"])), lat)
        with stage("png"):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
        return {"IMAGE": img, "PNG": np.array([buf.getvalue()], dtype=object), "TRUNCATED": te["TRUNCATED"]}
