"""One spec drives ONNX dynamic axes, TensorRT profiles, Triton dims, sample inputs and parity shapes."""
import dataclasses

import pytest

from export.spec import ComponentSpec, TensorSpec, dim_name, eval_dim
from export.tensorrt import EnginePlan, availability, build_engines, plan_engines
from export.triton_config import model_config, parse_pbtxt, to_pbtxt

UNET_LIKE = ComponentSpec(
    "unet", (TensorSpec("sample", "float32", ("N", 4, "h", "w")), TensorSpec("res", "float32", ("N", 64, "h/2", "w/2")),
             TensorSpec("ctx", "float32", ("N", "S", 128)), TensorSpec("ids", "int64", ("N", 77), 0, 10)),
    (TensorSpec("out", "float32", ("N", 4, "h", "w")),),
    {"N": (2, 2, 4), "h": (8, 16, 32), "w": (8, 16, 32), "S": (117, 137, 157)})


def test_dim_expressions():
    assert eval_dim("h/2", {"h": 16}) == 8 and eval_dim("8*h", {"h": 16}) == 128 and eval_dim(3, {}) == 3
    assert dim_name("h/2") == "h_d2" and dim_name("8*h") == "h_x8"
    with pytest.raises(ValueError):
        eval_dim("h/3", {"h": 16})


def test_all_views_derive_from_the_spec():
    axes = UNET_LIKE.dynamic_axes()
    assert axes["sample"] == {0: "N", 2: "h", 3: "w"} and axes["res"] == {0: "N", 2: "h_d2", 3: "w_d2"}
    prof = UNET_LIKE.profile()
    assert prof["res"] == {"min": (2, 64, 4, 4), "opt": (2, 64, 8, 8), "max": (4, 64, 16, 16)}
    assert prof["ctx"]["max"] == (4, 157, 128)
    cfg = parse_pbtxt(to_pbtxt(model_config(UNET_LIKE)))
    assert [list(i.dims) for i in cfg.input] == [[-1, 4, -1, -1], [-1, 64, -1, -1], [-1, -1, 128], [-1, 77]]
    batched = model_config(UNET_LIKE, max_batch_size=4)
    assert list(batched.input[0].dims) == [4, -1, -1]
    scalar = ComponentSpec("s", (TensorSpec("t", "float32", ("N",)),), (), {"N": (1, 2, 4)})
    t = model_config(scalar, max_batch_size=4).input[0]      # (N,) per sample: [1] outside, [] to the model
    assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == []
    # change one range: profile and sample shapes follow, nothing else to edit
    wider = dataclasses.replace(UNET_LIKE, symbols={**UNET_LIKE.symbols, "h": (8, 16, 64)})
    assert wider.profile()["sample"]["max"] == (4, 4, 64, 32)
    feeds = wider.sample_inputs(wider.assignment("max"))
    assert feeds["sample"].shape == (4, 4, 64, 32) and feeds["ids"].dtype.name == "int64" and feeds["ids"].max() < 10


def test_parity_assignments_try_every_axis_twice():
    values = UNET_LIKE.parity_assignments()
    for sym in UNET_LIKE.symbols:
        assert len({v[sym] for v in values}) >= 2, sym
    assert any(v["h"] != v["w"] for v in values)  # a non-square latent is tried


def test_tensorrt_plan_uses_spec_profiles(tmp_path):
    rec = {"files": [{"path": "onnx/unet/model.onnx"}], "profile": UNET_LIKE.profile()}
    plans = plan_engines({"unet": rec, "vae_decoder": rec}, tmp_path, refittable=True)
    unet, vae = plans
    assert isinstance(unet, EnginePlan) and unet.strongly_typed and unet.refittable and not vae.refittable
    assert unet.profile["sample"] == {"min": (2, 4, 8, 8), "opt": (2, 4, 16, 16), "max": (4, 4, 32, 32)}
    assert unet.engine_path == tmp_path / "engines" / "unet.plan" and "NATIVE_INSTANCENORM" in unet.parser_flags


def test_tensorrt_skips_with_a_reason_here(tmp_path):
    ok, reason = availability()
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    res = build_engines({"unet": {"files": [{"path": "x.onnx"}], "profile": UNET_LIKE.profile()}}, tmp_path)
    assert res["status"] == "skipped" and res["reason"] == reason and res["planned"] == ["unet"]
    assert "tensorrt" in reason or "GPU" in reason
