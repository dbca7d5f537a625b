"""Triton BLS model: the UniPC + CFG loop over given embeddings, calling `unet` (and `controlnet`) each step.

I/O: runtime/serving/contract.py (MODELS["sampler"]). The loop is runtime.denoise.denoise, the same as
in-process, through runtime.serving.logic.generate_latents, which checks `request.is_cancelled()` before
a step (at most every CANCEL_CHECK_S, 10 ms: each check is a round trip to the server).
"""
import torch
import triton_python_backend_utils as pb_utils

from storymaker_serve.runtime.pipeline import TextEmbeds
from storymaker_serve.runtime.serving.glue import generate_options
from storymaker_serve.runtime.serving.logic import check_text, check_tokens, validate_options
from storymaker_serve.runtime.serving.sampling import SamplingModel


class TritonPythonModel(SamplingModel):
    pb = pb_utils

    def _one(self, r):
        g = self.glue
        opts = generate_options(g, r, build=self.s.build)
        validate_options(opts, self.s.build)
        tokens = (g.array(r, "IMAGE_TOKENS", True), g.array(r, "NEG_IMAGE_TOKENS", True))
        check_tokens(*tokens, self.s.dim)
        embeds, pooled = g.array(r, "PROMPT_EMBEDS", True), g.array(r, "POOLED", True)
        check_text(embeds, pooled, self.s.build)                      # the checks storymaker's own text gets
        text = TextEmbeds(torch.from_numpy(embeds), torch.from_numpy(pooled))
        lat = self.s.latents(opts, text, tokens, r.is_cancelled)
        return {"LATENTS": lat.numpy()}
