"""Triton BLS model `storymaker_stream` (decoupled): the `storymaker` frame over a gRPC stream, with previews.

Every PREVIEW_EVERY steps (default 5, 0 for none) a response carries a low-resolution preview of the
current x0 prediction (IMAGE, one pixel per latent, FINAL false, STEPS_DONE); the last response carries the
frame, PNG and TRUNCATED with FINAL true, exactly what `storymaker` returns for the same request. Cancelling
the stream stops the loop before its next step. Logic: runtime.serving.frame.StreamModel.
"""
import triton_python_backend_utils as pb_utils

from storymaker_serve.runtime.serving.frame import StreamModel


class TritonPythonModel(StreamModel):
    pb = pb_utils
