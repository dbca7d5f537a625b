"""Triton BLS model: the UniPC + CFG loop over given embeddings, calling `unet` (and `controlnet`) each step.

I/O: runtime/serving/contract.py (MODELS["sampler"]). The loop is runtime.denoise.denoise, the same as
in-process, through runtime.serving.logic.generate_latents, which checks `request.is_cancelled()` before
a step (at most every CANCEL_CHECK_S, 10 ms: each check is a round trip to the server).
"""
import triton_python_backend_utils as pb_utils

from storymaker_serve.runtime.serving.request import sampler_request
from storymaker_serve.runtime.serving.sampling import SamplingModel


class TritonPythonModel(SamplingModel):
    pb = pb_utils

    def _one(self, r):
        req = sampler_request(self.glue, r, self.sampling.build)          # every input parsed and checked, once
        return {"LATENTS": self.sampling.latents(req.options, req.text, req.tokens, r.is_cancelled).numpy()}
