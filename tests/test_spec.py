"""One spec drives ONNX dynamic axes, TensorRT profiles, Triton dims, sample inputs and parity shapes."""
import dataclasses

import pytest

from storymaker_serve.export.tensorrt import EngineOptions, EnginePlan, availability, build_engines, plan_engines
from storymaker_serve.export.triton_config import model_config, parse_pbtxt, to_pbtxt
from storymaker_serve.runtime.spec import ComponentSpec, TensorSpec, dim_name, eval_dim

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
    plans = plan_engines({"unet": rec, "vae_decoder": rec}, tmp_path,
                         EngineOptions(refittable=True, version_compatible=True, hardware_compatibility="ampere+"))
    unet, vae = plans
    assert isinstance(unet, EnginePlan) and unet.strongly_typed and unet.refittable and not vae.refittable
    assert unet.version_compatible and vae.version_compatible and unet.hardware_compatibility == "ampere+"
    with pytest.raises(ValueError, match="hardware compatibility"):
        EngineOptions(hardware_compatibility="hopper")
    assert unet.profile["sample"] == {"min": (2, 4, 8, 8), "opt": (2, 4, 16, 16), "max": (4, 4, 32, 32)}
    assert unet.engine_path == tmp_path / "engines" / "unet.plan" and "NATIVE_INSTANCENORM" in unet.parser_flags


def test_tensorrt_skips_with_a_reason_here(tmp_path):
    ok, reason = availability()
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    res = build_engines({"unet": {"files": [{"path": "x.onnx"}], "profile": UNET_LIKE.profile()}}, tmp_path)
    assert res["unet"]["status"] == "skipped" and res["unet"]["reason"] == reason
    assert "tensorrt" in reason or "GPU" in reason


def test_max_batch_comes_from_the_profile():
    """Triton's max_batch_size for a batched engine is the profile's batch max (the TensorRT backend refuses a
    config that promises more rows than the engine's profile), in one place: ComponentSpec.max_batch."""
    assert UNET_LIKE.max_batch() == 4 == max(p["max"][0] for p in UNET_LIKE.profile().values())
    wide = dataclasses.replace(UNET_LIKE, symbols={**UNET_LIKE.symbols, "N": (2, 2, 8)})
    assert wide.max_batch() == 8
    mixed = ComponentSpec("ppr", (TensorSpec("a", "float32", ("n", 4)), TensorSpec("s", "float32", (1,))), (),
                          {"n": (1, 2, 3)})
    with pytest.raises(ValueError, match="batch axis"):
        mixed.max_batch()


def test_build_engines_per_component_records_failures(tmp_path, monkeypatch):
    """One engine failing does not stop the others; each gets a record (status, TensorRT version, flags, error);
    an unchanged engine whose file exists is reused."""
    import storymaker_serve.export.tensorrt as trt_mod

    monkeypatch.setattr(trt_mod, "availability", lambda: (True, "ok"))
    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: "10.8.0")
    built = []

    def fake_build(plan):
        if plan.component == "controlnet":
            raise RuntimeError("out of memory while building")
        built.append(plan.component)
        plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
        plan.engine_path.write_bytes(b"plan")
        return plan.engine_path

    monkeypatch.setattr(trt_mod, "build_engine", fake_build)
    rec = lambda key: {"files": [{"path": "x.onnx"}], "profile": UNET_LIKE.profile(), "key": key}
    records = {"unet": rec("u"), "controlnet": rec("c"), "vae_decoder": rec("v")}
    seen = []
    res = build_engines(records, tmp_path, EngineOptions(version_compatible=True), on_record=lambda n,
                        r: seen.append(n))
    assert seen == ["unet", "controlnet", "vae_decoder"] and built == ["unet", "vae_decoder"]
    assert res["controlnet"]["status"] == "failed" and "out of memory" in res["controlnet"]["error"]
    assert res["unet"] == {**res["unet"], "status": "built", "path": "engines/unet.plan", "tensorrt": "10.8.0",
                           "version_compatible": True}
    records["unet"]["engine"] = res["unet"]
    again = build_engines({"unet": records["unet"]}, tmp_path, EngineOptions(version_compatible=True))
    assert again["unet"]["cached"] and built == ["unet", "vae_decoder"]
    rebuilt = build_engines({"unet": {**records["unet"], "key": "u2"}}, tmp_path,
                            EngineOptions(version_compatible=True))
    assert not rebuilt["unet"].get("cached") and built[-1] == "unet"


def test_trt_flags_reach_the_builder_config(tmp_path, monkeypatch):
    """build_engine sets REFIT, VERSION_COMPATIBLE and the hardware compatibility level from the plan (a stand-in
    for the tensorrt module records the calls; the real API is not installed here)."""
    import sys
    import types

    import storymaker_serve.export.tensorrt as trt_mod

    calls = []

    class Obj:
        def __init__(self, name):
            self._n = name

        def __getattr__(self, k):
            return Obj(f"{self._n}.{k}")

        def __call__(self, *a, **k):
            calls.append((self._n, a))
            return Obj(f"{self._n}()")

        def __setattr__(self, k, v):
            if k != "_n":
                calls.append((f"{self._n}.{k}=", (v,)))
            object.__setattr__(self, k, v)

        def __int__(self):
            return 0

        def __bool__(self):
            return True

        def __bytes__(self):
            return b"engine"

    fake = Obj("trt")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(
        Logger=Obj("Logger"), Builder=lambda logger: fake, OnnxParser=lambda network, logger: Obj("parser"),
        NetworkDefinitionCreationFlag=Obj("NDCF"), OnnxParserFlag=Obj("OPF"), MemoryPoolType=Obj("MPT"),
        BuilderFlag=types.SimpleNamespace(REFIT="REFIT", VERSION_COMPATIBLE="VERSION_COMPATIBLE"),
        HardwareCompatibilityLevel=types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")))
    rec = {"files": [{"path": "x.onnx"}], "profile": UNET_LIKE.profile()}
    plan = plan_engines({"unet": rec}, tmp_path, EngineOptions(True, True, "ampere+"))[0]
    trt_mod.build_engine(plan)
    flags = [a[0] for n, a in calls if n == "trt.create_builder_config().set_flag"]
    assert flags == ["REFIT", "VERSION_COMPATIBLE"]
    assert ("trt.create_builder_config().hardware_compatibility_level=", ("AMPERE_PLUS",)) in calls


def test_bls_io_is_declared_once():
    """The BLS models' I/O lives in runtime/serving/contract.py: the table in docs/serving.md is generated from it, the
    glue's
    defaults are GenerateOptions' (the release's 960 wide x 1280 high portrait frame), and every sampling input
    the client can send maps to a declared port."""
    from pathlib import Path

    from storymaker_serve.runtime.pipeline import GenerateOptions
    from storymaker_serve.runtime.serving.client import OPTIONS
    from storymaker_serve.runtime.serving.contract import MODELS, SAMPLING, markdown_table

    readme = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    assert markdown_table() in readme
    defaults = {p.name: p.default for p in SAMPLING}
    assert defaults["WIDTH"] == GenerateOptions("x").width == 960
    assert defaults["HEIGHT"] == GenerateOptions("x").height == 1280
    assert set(OPTIONS) == {p.option for p in SAMPLING if p.option}
    assert [p.name for p in MODELS["storymaker"].inputs if p.optional][:2] == ["NEGATIVE_PROMPT", "IMAGE_TOKENS"]


def test_bls_configs_derive_from_the_declaration(built):
    """Each BLS config.pbtxt lists exactly the declared inputs/outputs, types and optionality, with the build's
    sizes (token width D, text length L) filled in."""
    from storymaker_serve.export.triton_config import parse_pbtxt
    from storymaker_serve.runtime.manifest import Manifest
    from storymaker_serve.runtime.serving.contract import MODELS

    m = Manifest(built)
    sizes = {"D": m.cross_attention_dim, "P": m.pooled_dim, "L": m.text_len, "C": m.latent_channels}
    assert sizes["L"] == 77 and m.vae_factor == 8
    for name, model in MODELS.items():
        cfg = parse_pbtxt((built / "triton_repo" / name / "config.pbtxt").read_text())
        assert [(i.name, list(i.dims), i.optional) for i in cfg.input] == \
            [(p.name, p.resolve(sizes), p.optional) for p in model.inputs], name
        assert [o.name for o in cfg.output] == [p.name for p in model.outputs], name
