"""Export helpers: external-data consolidation for > 2 GB models, opset validation, fp16 conversion."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import check_opset, consolidate_external_data, to_fp16


def _tiny_onnx(path):
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.LayerNorm(128), torch.nn.Linear(128, 8))
    torch.onnx.export(net.eval(), (torch.zeros(2, 64),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "B"}, "y": {0: "B"}}, opset_version=17, dynamo=False)
    return net


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_consolidate_many_external_files_into_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _tiny_onnx(src / "m.onnx")
    m = onnx.load(str(src / "m.onnx"))
    onnx.save_model(m, str(src / "raw.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)   # one file per tensor, as the legacy exporter writes above 2 GB
    assert len(list(src.iterdir())) > 4
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    files = consolidate_external_data(src / "raw.onnx", out)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"] and sorted(p.name for p in out.parent.iterdir()) == \
        ["model.onnx", "model.onnx.data"]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(_run(src / "m.onnx", x), _run(out, x))


def test_fp16_variant_keeps_float32_io(tmp_path):
    net = _tiny_onnx(tmp_path / "m.onnx")
    to_fp16(tmp_path / "m.onnx", tmp_path / "h.onnx")
    h = onnx.load(str(tmp_path / "h.onnx"))
    assert h.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in h.graph.initializer)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    want = net(torch.from_numpy(x)).detach().numpy()
    got = _run(tmp_path / "h.onnx", x)
    cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos > 0.999 and np.abs(got - want).max() > 0   # fp16 weights: close, not identical


@pytest.mark.parametrize("opset", [11, 16, 21])
def test_unsupported_opsets(opset):
    with pytest.raises(ValueError, match=f"opset {opset} is not supported"):
        check_opset(opset)
