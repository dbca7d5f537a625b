"""Triton BLS model: 1-3 characters' photos + masks (+ cloth, face info) -> image tokens, once per story.

Preprocessing (mask crop, composite, face detection/alignment with the build's
buffalo_l files, CLIP preprocessing) runs here, in-process; CLIP and the
resampler run as the `clip_vision` and `ppr` models via BLS. Outputs
IMAGE_TOKENS and NEG_IMAGE_TOKENS [1, 20(n+1), D] for `storymaker`/`sampler`.
"""
import triton_python_backend_utils as pb_utils

from storymaker_serve.runtime.serving.engines import Build
from storymaker_serve.runtime.serving.glue import Glue, setup
from storymaker_serve.runtime.serving.logic import CharacterEncoding
from storymaker_serve.runtime.serving.request import character_request


class TritonPythonModel:
    def initialize(self, args):
        _, params = setup(args)
        self.glue = Glue(pb_utils, params)
        self.enc = CharacterEncoding(Build(params["build_dir"]),
                                     clip_fn=lambda f: self.glue.engine("clip_vision", f, ["hidden_states"]),
                                     ppr_fn=lambda f: self.glue.engine("ppr", f, ["image_tokens"]))

    def _one(self, r):
        pos, neg = self.enc(character_request(self.glue, r, self.enc.max_chars))   # budgets before decoding anything
        return {"IMAGE_TOKENS": pos, "NEG_IMAGE_TOKENS": neg}

    def execute(self, requests):
        return self.glue.run_each(requests, self._one)
