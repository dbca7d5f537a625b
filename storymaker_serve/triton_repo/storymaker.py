"""Triton BLS model `storymaker`: one story frame, prompt + characters -> uint8 image and PNG.

Character tokens are either given (IMAGE_TOKENS/NEG_IMAGE_TOKENS from one
`encode_characters` call per story) or computed here from PHOTOS/MASKS (+ CLOTHS,
FACE_INFO, ...) through `encode_characters`. Then the text encoders, the UniPC
loop (`request.is_cancelled()` checked before a step, at most every 10 ms, as
runtime.serving.logic.generate_latents) and `vae_decoder`; the engines run as their
own models via BLS or in this process (config parameter `denoise_engines`). A BLS model rather
than a static ensemble: its inputs are optional and cancellation must reach
the denoising loop. Outputs IMAGE [H, W, 3] uint8, PNG [1] bytes, TRUNCATED [1].
The frame itself is runtime.serving.frame.FrameModel._frame, shared with `storymaker_stream`.
"""
import triton_python_backend_utils as pb_utils

from storymaker_serve.runtime.serving.frame import FrameModel


class TritonPythonModel(FrameModel):
    pb = pb_utils

    def _one(self, r):
        return self._frame(r)
