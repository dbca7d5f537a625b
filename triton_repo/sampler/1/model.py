"""Triton BLS model: the UniPC + CFG loop over given embeddings, calling `unet` (and `controlnet`) each step.

Inputs: PROMPT_EMBEDS [2, 77, D], POOLED [2, P], IMAGE_TOKENS/NEG_IMAGE_TOKENS
[1, T, D], and optional SEED, STEPS, GUIDANCE, WIDTH, HEIGHT, IP_SCALE, POSE
(PNG/JPEG bytes), CONTROLNET_SCALE. Output: LATENTS [1, 4, H/8, W/8]. The loop is
runtime.serving.logic.generate_latents (the same as in-process); it checks
`request.is_cancelled()` before every step.
"""
import torch
import triton_python_backend_utils as pb_utils

from runtime.pipeline import TextEmbeds
from runtime.serving.logic import check_tokens, generate_latents, validate_options
from runtime.serving.glue import Glue, Sampling, generate_options, setup


class TritonPythonModel:
    def initialize(self, args):
        _, params = setup(args)
        self.glue = Glue(pb_utils)
        self.s = Sampling(self.glue, params["build_dir"])

    def _one(self, r):
        g = self.glue
        opts = generate_options(g, r)
        validate_options(opts, self.s.unet)
        tokens = (g.array(r, "IMAGE_TOKENS", True), g.array(r, "NEG_IMAGE_TOKENS", True))
        check_tokens(*tokens, self.s.dim)
        text = TextEmbeds(torch.from_numpy(g.array(r, "PROMPT_EMBEDS", True)), torch.from_numpy(g.array(r, "POOLED", True)))
        lat = generate_latents(opts, text, tokens, self.s.denoiser(), self.s.scheduler, r.is_cancelled)
        return {"LATENTS": lat.numpy()}

    def execute(self, requests):
        return self.glue.run_each(requests, self._one)
