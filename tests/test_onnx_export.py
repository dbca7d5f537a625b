"""Export helpers: external-data consolidation for > 2 GB models, opset validation, fp16 conversion."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from storymaker_serve.export.onnx_export import check_opset, consolidate_external_data, to_fp16


def _tiny_onnx(path):
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.LayerNorm(128),
                              torch.nn.Linear(128, 8))
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
    assert [f.name for f in files] == ["model.onnx",
                                       "model.onnx.data"] and sorted(p.name for p in out.parent.iterdir()) == \
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


def test_fp16_of_external_data_model_streams_the_same_weights(tmp_path):
    """Graphs over 2 GB keep their weights in external data; to_fp16 converts the graph alone and streams the
    weights tensor by tensor. The result equals the in-memory conversion of the same model, weight for weight."""
    from onnx import numpy_helper

    _tiny_onnx(tmp_path / "m.onnx")
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(onnx.load(str(tmp_path / "m.onnx")), str(ext / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    files = to_fp16(ext / "m.onnx", tmp_path / "streamed" / "h.onnx")
    assert [f.name for f in files] == ["h.onnx", "h.onnx.data"]
    to_fp16(tmp_path / "m.onnx", tmp_path / "h.onnx")                  # in-memory path
    weights = lambda p: {t.name: numpy_helper.to_array(t, base_dir=str(p.parent)) for t in
                         onnx.load(str(p), load_external_data=False).graph.initializer}
    a, b = weights(tmp_path / "h.onnx"), weights(files[0])
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert any(v.dtype == np.float16 for v in b.values()) and any(v.dtype == np.float32 for v in b.values())
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(_run(files[0], x), _run(tmp_path / "h.onnx", x))
