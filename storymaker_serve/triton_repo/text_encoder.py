"""Triton BLS model: both SDXL tokenizers, then the engine models `text_encoder_1` and `text_encoder_2` (one call
each, the prompt and the negative prompt as one batch; runtime.serving.logic.TextEncoding).

PROMPT (and optional NEGATIVE_PROMPT; absent = zero embeddings, as SDXL) ->
PROMPT_EMBEDS [2, 77, D] (negative, positive), POOLED [2, P], TRUNCATED
(the prompt exceeded 77 tokens and was cut, as SDXL does; also logged).
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from storymaker_serve.runtime.serving.engines import Build
from storymaker_serve.runtime.serving.glue import Glue, setup, text_engine_fns
from storymaker_serve.runtime.serving.logic import TextEncoding
from storymaker_serve.runtime.serving.request import prompt


class TritonPythonModel:
    def initialize(self, args):
        _, params = setup(args)
        self.glue = Glue(pb_utils, params)
        build = Build(params["build_dir"])
        self.te = TextEncoding(build, text_engine_fns(self.glue, build))

    def _one(self, r):
        text, truncated = self.te(prompt(self.glue, r), prompt(self.glue, r, "NEGATIVE_PROMPT", required=False))
        return {"PROMPT_EMBEDS": text.prompt_embeds.numpy(), "POOLED": text.pooled.numpy(),
                "TRUNCATED": np.array([truncated])}

    def execute(self, requests):
        return self.glue.run_each(requests, self._one)
