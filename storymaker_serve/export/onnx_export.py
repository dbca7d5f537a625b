"""ONNX export of one component: torch.onnx, graph cleanup, external data, fp16 variant.

Exporter choice (ENVIRONMENT.md measurements, recorded per component in the
manifest): the TorchScript-based exporter (`dynamo=False`, opset 17) for every
component. It exported a tiny SDXL-shaped decoupled-attention UNet 4-20x
faster than the dynamo exporter with the same accuracy (~1e-6), takes our
`dynamic_axes` as named, and its graphs parse in TensorRT's ONNX parser. The
full-size SDXL UNet (> 2 GB) is saved with all weights in one external
`.onnx.data` file. Cleanup is onnxslim (constant folding, dead-node removal,
shape inference) for models under 2 GB. fp16 variants are made with
onnxruntime's float16 converter with float32 I/O, keeping normalisation,
softmax/exp/pow and reductions in float32 (the numerically sensitive ops).

fp16 of graphs over 2 GB (UNet 11.6 GB, text_encoder_2 2.8 GB, CLIP-H 2.5 GB,
ControlNet in fp32) runs the same converter on the graph alone: the model is
loaded without its external data (a few MB of protobuf), the converter decides
per node and initializer what becomes fp16 and where Casts go (shape inference
works on the graph-only model), and the weights are then streamed one tensor
at a time from the fp32 data file into the fp16 one, rounded with the
converter's own clamping. Host memory stays at one tensor (the largest SDXL
weight is 26 MB); the graph and the op policy are exactly the small-graph
path's. Chosen over exporting from an fp16 PyTorch model because that would
put normalisations and softmax in fp16 (no per-op policy) and needs a second
full-size trace; the streamed conversion costs one read and one write of the
weights.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo

from storymaker_serve.runtime.spec import ComponentSpec

log = logging.getLogger(__name__)
SUPPORTED_OPSETS = range(17, 21)
TWO_GB = 2**31
FP32_OPS = ["LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean", "ReduceSum", "Softmax",
            "Exp", "Pow", "Sqrt", "Erf", "Reciprocal", "Div", "Resize", "Range", "CumSum"]


def check_opset(opset: int) -> int:
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset {opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
                         "(17 is the default: LayerNormalization as one node, TensorRT 8.6+ parses it)")
    return opset


def torch_inputs(spec: ComponentSpec, values: dict[str, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a) for a in spec.sample_inputs(values, seed).values())


def _save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save, with one external data file when the model exceeds protobuf's 2 GB limit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
    if model.ByteSize() < TWO_GB:
        onnx.save_model(model, str(path))
        return [path]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return [path, path.parent / data]


def stable_weight_names(model: onnx.ModelProto) -> int:
    """Rename the exporter's numbered initializers (`onnx::MatMul_4486`: a counter over the whole trace, which any
    change elsewhere in the graph shifts) after the node that reads them (`unet.down_blocks.1.attentions.0.
    transformer_blocks.0.attn2.to_k.MatMul.input1`), derived from the module path. TensorRT refit
    (OnnxParserRefitter) matches weights by initializer name, so the refittable UNet and a re-export with another
    lora_scale must name each LoRA-affected weight the same way, and a person can find it. Returns how many."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            consumers.setdefault(x, []).append((node, i))
    renamed, taken = {}, {t.name for t in model.graph.initializer}
    for t in model.graph.initializer:
        users = consumers.get(t.name, [])
        if not t.name.startswith("onnx::") or not users or not users[0][0].name:
            continue
        node, i = users[0]
        new = f"{node.name.strip('/').replace('/', '.')}.input{i}"
        if new in taken:
            continue
        taken.add(new)
        renamed[t.name] = new
        t.name = new
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            if x in renamed:
                node.input[i] = renamed[x]
    return len(renamed)


TRACE_LATENT = 64     # latent side the image axes are traced at, at most (512 px with SDXL's VAE)


def trace_assignment(spec: ComponentSpec) -> dict[str, int]:
    """The shapes the exporter traces at: the profile's optimum, with the image axes (h, w) at their minimum,
    capped at TRACE_LATENT. The axes stay dynamic either way (parity checks the profile's shapes); the smaller
    trace bounds the full-size export's memory and time (a 1024 px UNet trace holds 4096-token attention maps)."""
    values, low = spec.assignment("opt"), spec.assignment("min")
    return {k: min(low[k], TRACE_LATENT) if k in ("h", "w") else v for k, v in values.items()}


def export_onnx(graph: torch.nn.Module, spec: ComponentSpec, path: Path, opset: int = 17) -> dict:
    """Export `graph` to `path` (fp32); returns {'files': [...], 'seconds': s, 'exporter': ..., 'slimmed': bool}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args = torch_inputs(spec, trace_assignment(spec))
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:   # the legacy exporter may write per-tensor files
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(graph, args, str(raw), input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                              opset_version=check_opset(opset), dynamo=False, do_constant_folding=True)
        large = sum(f.stat().st_size for f in Path(tmp).iterdir()) >= TWO_GB
        if large:   # never materialise > 2 GB of weights in protobuf: stream them into one data file
            files, slimmed = consolidate_external_data(raw, path), False
        else:
            import onnxslim

            model = onnx.load(str(raw))
            stable_weight_names(model)
            files, slimmed = _save(onnxslim.slim(model), path), True
    return {"files": files, "seconds": time.perf_counter() - t0,
            "exporter": f"torch.onnx (dynamo=False) {torch.__version__}",
            "opset": opset, "slimmed": slimmed}


def consolidate_external_data(raw: Path, path: Path) -> list[Path]:
    """Rewrite a model whose tensors live in many external files to `path` + one `path.data`, tensor by tensor."""
    model = onnx.load(str(raw), load_external_data=False)
    stable_weight_names(model)                          # metadata only: the external data stays where it is
    return _rewrite_external_data(model, raw.parent, path)


def _rewrite_external_data(model: onnx.ModelProto, src_dir: Path, dst: Path, convert=None) -> list[Path]:
    """Save `model` (loaded without its external data) as `dst` + one `dst.data`: each external tensor is read from
    its source file under `src_dir`, passed through `convert(tensor, blob) -> blob` if given, and written
    page-aligned (mmap-friendly). Host memory holds one tensor at a time."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for old in dst.parent.glob(dst.name + "*"):
        old.unlink()
    data_name = dst.name + ".data"
    offset = 0
    with open(dst.parent / data_name, "wb") as out:
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(t)
            with open(src_dir / info.location, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
            if convert is not None:
                blob = convert(t, blob)
            pad = (-offset) % 4096
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += len(blob)
    onnx.save_model(model, str(dst))
    return [dst, dst.parent / data_name]


def to_fp16(src: Path, dst: Path) -> list[Path]:
    """fp16 weights/compute with float32 I/O; sensitive ops stay float32. Graphs with external data (> 2 GB) are
    converted graph-only and their weights streamed tensor by tensor (module doc)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return _save(convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS), dst)

    import onnxruntime.transformers.float16 as f16

    was_float = {t.name for t in external if t.data_type == onnx.TensorProto.FLOAT}
    # The converter reads an initializer's data only for its shape (value info); the shape is in its dims.
    shape_from_dims = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    with mock.patch.object(f16, "make_value_info_from_tensor", shape_from_dims):
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)

    def round_converted(t, blob: bytes) -> bytes:
        """Tensors the converter turned to FLOAT16 are rounded here, with its own clamping; others stay as they are."""
        if t.data_type == onnx.TensorProto.FLOAT16 and t.name in was_float:
            return f16.convert_np_to_float16(np.frombuffer(blob, dtype=np.float32)).astype(np.float16).tobytes()
        return blob

    return _rewrite_external_data(half, src.parent, dst, round_converted)
