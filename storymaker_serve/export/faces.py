"""The insightface buffalo_l ONNX files as build components: validated, optionally fp16, copied.

`face_detector` (SCRFD det_10g.onnx) and `face_recognizer` (ArcFace
w600k_r50.onnx) are not re-exported: the build checks each file with the
ONNX checker and against the I/O signature insightface routes on (detector:
one image input, >= 5 outputs; recognizer: square input of >= 112), then
copies it (fp32) or converts it (fp16, float32 I/O). Their spec is read from
the file itself; parity runs the built file against the source file in
onnxruntime (a copy must match bit for bit, fp16 by cosine similarity).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import torch

from storymaker_serve.export.onnx_export import to_fp16
from storymaker_serve.export.parity import session
from storymaker_serve.runtime.errors import WeightsError
from storymaker_serve.runtime.spec import ComponentSpec, TensorSpec
from storymaker_serve.runtime.weights import SOURCES

FILES = {"face_detector": "det_10g.onnx", "face_recognizer": "w600k_r50.onnx"}


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def face_spec(name: str, path: Path) -> ComponentSpec:
    try:
        onnx.checker.check_model(str(path))
        g = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # checker/protobuf errors
        raise WeightsError(f"{path}: not a valid ONNX model ({str(e)[:200]}); re-download buffalo_l") from None
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    dims = _dims(inputs[0])
    if name == "face_detector":
        if len(inputs) != 1 or len(dims) != 4 or len(g.output) < 5:
            raise WeightsError(f"{path}: expected an SCRFD detector (1 image input, >= 5 outputs), got "
                               f"{len(inputs)} inputs and {len(g.output)} outputs")
        inp = TensorSpec(inputs[0].name, "float32", (1, 3, "H", "W"))
        symbols = {"H": (320, 640, 640), "W": (320, 640, 640)}
    else:
        if len(dims) != 4 or dims[2] != dims[3] or (dims[2] or 0) < 112:
            raise WeightsError(f"{path}: expected an ArcFace recognizer with a square >= 112 input, got {dims}")
        inp = TensorSpec(inputs[0].name, "float32", ("N", 3, dims[2], dims[3]))
        symbols = {"N": (1, 1, 3)}
    outs = tuple(TensorSpec(o.name, "float32", tuple(d if d else f"d{j}" for j, d in enumerate(_dims(o))))
                 for o in g.output)
    return ComponentSpec(name, (inp,), outs, symbols, 0.0,
                         f"insightface buffalo_l {FILES[name]}, copied (not re-exported)")


class OnnxReference(torch.nn.Module):
    """The source ONNX file, run in onnxruntime, as the parity reference."""

    def __init__(self, path: Path, spec: ComponentSpec):
        super().__init__()

        self.sess, self.spec = session(path), spec

    def forward(self, *xs):
        feeds = {t.name: x.numpy() for t, x in zip(self.spec.inputs, xs)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.sess.run([t.name for t in self.spec.outputs], feeds))


def build_face_model(name: str, folder: Path, out_dir: Path, precision: str) -> tuple[ComponentSpec, list[Path], Path]:
    """-> (spec, built files, source file)."""
    src = folder / FILES[name]
    if not src.exists():
        raise WeightsError(f"{src}: missing (insightface buffalo_l); get {SOURCES['buffalo_l']}")
    spec = face_spec(name, src)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / ("model.fp16.onnx" if precision == "fp16" else "model.onnx")
    if precision == "fp16":
        files = to_fp16(src, dst)
    else:
        shutil.copyfile(src, dst)
        files = [dst]
    return spec, files, src
