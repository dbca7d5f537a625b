"""Triton BLS model: the UniPC + CFG loop over given embeddings, calling `unet` (and `controlnet`) each step.

Inputs: PROMPT_EMBEDS [2, 77, D], POOLED [2, P], IMAGE_TOKENS/NEG_IMAGE_TOKENS
[1, T, D], and optional SEED, STEPS, GUIDANCE, WIDTH, HEIGHT, IP_SCALE, POSE
(PNG/JPEG bytes), CONTROLNET_SCALE. Output: LATENTS [1, 4, H/8, W/8]. The loop is
runtime.served.generate_latents (the same as in-process); it checks
`request.is_cancelled()` before every step.
"""
import json

import torch
import triton_python_backend_utils as pb_utils

from runtime.engines import Build
from runtime.pipeline import TextEmbeds
from runtime.served import EngineDenoiser, check_tokens, generate_latents, validate_options
from runtime.triton_glue import Glue, generate_options, setup


class TritonPythonModel:
    def initialize(self, args):
        _, params = setup(args)
        self.glue = Glue(pb_utils)
        b = Build(params["build_dir"])
        self.unet = b.manifest["components"]["unet"]
        self.sched = json.loads((b.path / b.manifest["assets"]["scheduler_config"]).read_text())
        cn = (lambda f: self.glue.engine("controlnet", f, [t["name"] for t in b.manifest["components"]["controlnet"]["outputs"]])) \
            if b.has("controlnet") else None
        self.denoiser = lambda: EngineDenoiser(self.unet, lambda f: self.glue.engine("unet", f, ["noise_pred"]), cn)

    def _one(self, r):
        g = self.glue
        opts = generate_options(g, r)
        validate_options(opts, self.unet)
        tokens = (g.array(r, "IMAGE_TOKENS", True), g.array(r, "NEG_IMAGE_TOKENS", True))
        check_tokens(*tokens, self.unet["spec"]["inputs"][2]["dims"][2])
        text = TextEmbeds(torch.from_numpy(g.array(r, "PROMPT_EMBEDS", True)), torch.from_numpy(g.array(r, "POOLED", True)))
        lat = generate_latents(opts, text, tokens, self.denoiser(), self.sched, r.is_cancelled)
        return {"LATENTS": lat.numpy()}

    def execute(self, requests):
        return self.glue.run_each(requests, self._one)
