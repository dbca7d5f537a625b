"""GPU-only paths pinned on a CPU: what a first run on a GPU server would otherwise discover.

The NGC repository's configs against the engine profiles, per-component engine records and failures, a
relocatable repository, TensorRT version requirements stated by the launcher, and stable weight names for
refit. (bf16 timesteps and the CUDA-graph cache: tests/test_fast.py; the kernel's device placement, loud
fallback and benchmark: tests/test_dual_attention.py.)
"""
import json
import shutil

import numpy as np
import onnx
import pytest
from helpers import DATA, copy_build

from storymaker_serve.export.build import main as build_main
from storymaker_serve.export.triton_config import parse_pbtxt
from storymaker_serve.runtime.errors import StoryMakerError

ENGINE_MODELS = ("clip_vision", "ppr", "text_encoder_1", "text_encoder_2", "unet", "controlnet", "vae_decoder")


def test_batched_configs_promise_no_more_rows_than_the_profile(built):
    """Triton's TensorRT backend refuses a config whose max_batch_size exceeds the engine profile's batch max;
    both repositories take it from the profile."""
    m = json.loads((built / "manifest.json").read_text())
    for repo in ("triton_repo", "triton_repo_ngc"):
        for name in ("unet", "controlnet"):
            cfg = parse_pbtxt((built / repo / name / "config.pbtxt").read_text())
            prof = m["components"][name]["profile"]
            assert cfg.max_batch_size == min(p["max"][0] for p in prof.values()) == 8, (repo, name)
            assert all(p["max"][0] >= cfg.max_batch_size for p in prof.values())


def test_ngc_repository_is_relocatable(built, tmp_path):
    """No host path in any NGC config, model files are relative links inside the build folder, and a build folder
    moved elsewhere (the original deleted) still resolves every file; the Python models find it as ../.."""
    from storymaker_serve.runtime.serving.glue import setup

    ngc = built / "triton_repo_ngc"
    for cfg_file in ngc.glob("*/config.pbtxt"):
        text = cfg_file.read_text()
        assert str(built) not in text and "/work/" not in text and ".venv" not in text, cfg_file
        assert "EXECUTION_ENV_PATH" not in text and "project_root" not in text
    links = [p for p in ngc.rglob("*") if p.is_symlink()]
    assert links and all(not p.readlink().is_absolute() for p in links)
    moved = tmp_path / "elsewhere" / "build"
    shutil.copytree(built, moved, symlinks=True)
    for p in (moved / "triton_repo_ngc").rglob("*"):
        if p.is_symlink():
            assert p.resolve().is_file() and str(p.resolve()).startswith(str(moved)), p
    cfg = parse_pbtxt((moved / "triton_repo_ngc" / "storymaker" / "config.pbtxt").read_text())
    params = {k: {"string_value": v.string_value} for k, v in cfg.parameters.items()}
    args = {"model_config": json.dumps({"parameters": params}),
            "model_repository": str(moved / "triton_repo_ngc" / "storymaker")}
    _, params = setup(args)
    assert params["build_dir"] == str(moved) and (moved / "manifest.json").exists()


def test_ngc_python_env_lies_in_every_python_models_folder(built, tmp_path):
    """python_backend defines EXECUTION_ENV_PATH relative to the model's own folder only: the packed environment
    lies in each Python model's folder (hard links to one copy) and is named there."""
    from storymaker_serve.export.triton_repo import write_ngc_repo

    b = copy_build(built, tmp_path)
    env = tmp_path / "env.tar.gz"
    env.write_bytes(b"packed")
    out, _ = write_ngc_repo(b, python_env=env)
    python_models = [d.parent.parent.name for d in out.glob("*/1/model.py")]
    assert {"sampler", "storymaker", "encode_characters", "text_encoder"} <= set(python_models)
    for name in python_models:
        assert (out / name / "python_env.tar.gz").read_bytes() == b"packed"
        cfg = parse_pbtxt((out / name / "config.pbtxt").read_text())
        env_path = cfg.parameters["EXECUTION_ENV_PATH"].string_value
        assert env_path == "$$TRITON_MODEL_DIRECTORY/python_env.tar.gz" and ".." not in env_path
    inode = lambda model: (out / model / "python_env.tar.gz").stat().st_ino
    assert inode("sampler") == inode("storymaker")                       # one copy on disk
    with pytest.raises(FileNotFoundError, match="conda-pack"):
        write_ngc_repo(b, python_env=tmp_path / "missing.tar.gz")


def test_engine_failures_are_recorded_and_survive_a_partial_rebuild(built, tmp_path, monkeypatch, capsys):
    """With TensorRT 'available' (a stand-in builder), one failing engine is recorded for its component, the
    others build, the manifest is written, and the NGC repository uses tensorrt_plan where an engine exists and
    onnxruntime (saying why) where it failed. A later partial build keeps the other components' engines."""
    import storymaker_serve.export.tensorrt as trt_mod

    b = copy_build(built, tmp_path)
    monkeypatch.setattr(trt_mod, "availability", lambda: (True, "ok"))
    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: "10.8.0")

    def fake_build(plan):
        if plan.component == "vae_decoder":
            raise RuntimeError("Myelin error: out of memory")
        plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
        plan.engine_path.write_bytes(plan.component.encode())
        return plan.engine_path

    monkeypatch.setattr(trt_mod, "build_engine", fake_build)
    args = ["--weights", str(built / "demo_bundle"), "--out", str(b)]
    assert build_main(args + ["--trt-version-compatible"]) == 0
    out = capsys.readouterr().out
    assert "TensorRT engine vae_decoder: failed (RuntimeError: Myelin error" in out
    m = json.loads((b / "manifest.json").read_text())
    comps = m["components"]
    assert comps["vae_decoder"]["engine"]["status"] == "failed" and "Myelin" in comps["vae_decoder"]["engine"]["error"]
    assert comps["unet"]["engine"] == {**comps["unet"]["engine"], "status": "built", "tensorrt": "10.8.0",
                                       "version_compatible": True}
    assert m["engines"]["failed"] == ["vae_decoder"] and m["engines"]["tensorrt"] == ["10.8.0"]
    ngc = b / "triton_repo_ngc"
    unet = parse_pbtxt((ngc / "unet" / "config.pbtxt").read_text())
    assert unet.platform == "tensorrt_plan" and (ngc / "unet" / "1" / "model.plan").read_bytes() == b"unet"
    assert unet.max_batch_size == 8
    vae = parse_pbtxt((ngc / "vae_decoder" / "config.pbtxt").read_text())
    assert vae.backend == "onnxruntime" and (ngc / "vae_decoder" / "1" / "model.onnx").is_file()
    assert m["ngc_repository"]["vae_decoder"]["backend"] == "onnxruntime"
    assert "failed" in m["ngc_repository"]["vae_decoder"]["why"]
    # a partial rebuild without TensorRT: the unet keeps its engine record and its tensorrt_plan model
    monkeypatch.setattr(trt_mod, "availability", lambda: (False, "no CUDA GPU is visible"))
    assert build_main(args + ["--components", "ppr"]) == 0
    m2 = json.loads((b / "manifest.json").read_text())
    assert m2["components"]["unet"]["engine"]["status"] == "built"
    assert parse_pbtxt((ngc / "unet" / "config.pbtxt").read_text()).platform == "tensorrt_plan"


def test_launcher_states_the_tensorrt_an_ngc_container_needs(built, tmp_path):
    from storymaker_serve.runtime.gpu import trt_loads as _trt_loads
    from storymaker_serve.runtime.serving.launcher import main
    from storymaker_serve.runtime.serving.ngc import ngc_command

    b = copy_build(built, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    cmd, notes = ngc_command(b)                     # no engines: onnxruntime models, no TensorRT requirement
    assert "--model-repository=/models/triton_repo_ngc" in cmd and not any("backend-config" in c for c in cmd)
    m["components"]["unet"]["engine"] = {"status": "built", "path": "engines/unet.plan", "tensorrt": "10.8.0",
                                         "version_compatible": False}
    (b / "manifest.json").write_text(json.dumps(m))
    cmd, notes = ngc_command(b, container_tensorrt="10.8.0")
    assert "exactly" in notes[0] and "10.8.0" in notes[0]
    with pytest.raises(StoryMakerError, match="TensorRT 10.9.0 cannot load the engines of \\['unet'\\]"):
        ngc_command(b, container_tensorrt="10.9.0")
    m["components"]["unet"]["engine"]["version_compatible"] = True
    (b / "manifest.json").write_text(json.dumps(m))
    cmd, _ = ngc_command(b, container_tensorrt="10.9.0")
    assert "--backend-config=tensorrt,version-compatible=true" in cmd
    assert _trt_loads({"tensorrt": "10.8.0", "version_compatible": True}, "10.9.1")
    assert not _trt_loads({"tensorrt": "10.8.0", "version_compatible": True}, "10.7.0")
    assert not _trt_loads({"tensorrt": "10.8.0", "version_compatible": True}, "11.0.0")
    assert main(["--ngc-command", str(b), "--container-tensorrt", "9.3.0"]) == 2


def _lora_names(path):
    from storymaker_serve.export.refit import lora_weight_names, weight_names

    return lora_weight_names(weight_names(path))


@pytest.mark.slow
def test_refit_weights_are_found_by_stable_names(built, tmp_path, capsys):
    """TensorRT refit matches weights by initializer name. The UNet re-exported with another lora_scale names
    every weight as the build did, every LoRA-affected projection (to_q/to_k/to_v/to_out.0 of each attn1/attn2)
    is findable by its module path, and only those weights change. Then `python -m export.refit --dry-run`
    runs the same steps up to TensorRT, and without an engine the real run says how to build one."""
    from onnx import numpy_helper

    from storymaker_serve.export.refit import check_refit_names
    from storymaker_serve.export.refit import main as refit_main

    b = copy_build(built, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    old_onnx = b / m["components"]["unet"]["files"][0]["path"]
    n_attn = sum(1 for n in onnx.load(str(old_onnx)).graph.node if n.name.endswith("/attn1/to_q/MatMul"))
    lora = _lora_names(old_onnx)
    assert n_attn > 0 and len(lora) == 8 * n_attn                 # 4 projections x (attn1 + attn2) per block
    assert not any(n.startswith("onnx::") for n in lora)
    assert refit_main(["--build", str(b), "--weights", str(built / "demo_bundle"), "--lora-scale", "0.5",
                       "--dry-run"]) == 0
    new_onnx = b / "refit" / m["components"]["unet"]["files"][0]["path"]
    assert check_refit_names(old_onnx, new_onnx) == lora
    old_w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(old_onnx)).graph.initializer}
    new_w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(new_onnx)).graph.initializer}
    changed = {k for k in old_w if old_w[k].shape != new_w[k].shape or (old_w[k] != new_w[k]).any()}
    assert changed and changed <= set(lora)                         # only the LoRA-affected weights differ
    assert "weights match by name" in capsys.readouterr().out
    assert refit_main(["--build", str(b), "--weights", str(built / "demo_bundle")]) == 2
    assert "--engines auto --refittable" in capsys.readouterr().err


def test_stable_names_survive_fp16_conversion(built, tmp_path):
    from storymaker_serve.export.onnx_export import to_fp16

    m = json.loads((built / "manifest.json").read_text())
    src = built / m["components"]["unet"]["files"][0]["path"]
    half = to_fp16(src, tmp_path / "model.fp16.onnx")[0]
    assert _lora_names(half) == _lora_names(src)


def test_stable_names_rename_numbered_initializers():
    """The renaming itself: numbered exporter names become '<node path>.input<i>'; inputs are rewired."""
    from onnx import TensorProto, helper

    from storymaker_serve.export.onnx_export import stable_weight_names

    w = helper.make_tensor("onnx::MatMul_4486", TensorProto.FLOAT, [2, 2], [1, 0, 0, 1])
    node = helper.make_node("MatMul", ["x", "onnx::MatMul_4486"], ["y"], name="/unet/mid/attn2/to_k/MatMul")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [w])
    model = helper.make_model(g)
    assert stable_weight_names(model) == 1
    assert model.graph.initializer[0].name == "unet.mid.attn2.to_k.MatMul.input1" == model.graph.node[0].input[1]
    onnx.checker.check_model(model)


def test_zero_residuals_are_not_shipped_per_step(built):
    """Without a pose map no ControlNet residuals travel to the UNet: the Python-backend unet declares them
    optional and its runner feeds zeros made once per shape; with a pose map they are sent. The NGC repository
    (native engines need every input) keeps them required and tells its BLS models to send them."""
    from storymaker_serve.export.triton_config import parse_pbtxt
    from storymaker_serve.runtime.pipeline import GenerateOptions
    from storymaker_serve.runtime.serving.engines import Build
    from storymaker_serve.runtime.serving.logic import EnginePipeline
    from storymaker_serve.runtime.serving.request import CharacterRequest

    unet = parse_pbtxt((built / "triton_repo" / "unet" / "config.pbtxt").read_text())
    res = [i for i in unet.input if i.name.startswith(("down_res", "mid_res"))]
    assert res and all(i.optional for i in res) and not any(i.optional for i in unet.input if i not in res)
    ngc = parse_pbtxt((built / "triton_repo_ngc" / "unet" / "config.pbtxt").read_text())
    assert not any(i.optional for i in ngc.input)
    sampler = parse_pbtxt((built / "triton_repo_ngc" / "sampler" / "config.pbtxt").read_text())
    assert sampler.parameters["send_zero_residuals"].string_value == "true"

    ep = EnginePipeline(Build(built))
    sent, run = [], ep.denoiser.unet_fn
    ep.denoiser.unet_fn = lambda feeds: sent.append(sorted(feeds)) or run(feeds)
    data = lambda f: (DATA / f).read_bytes()
    tokens = ep.encode_characters(CharacterRequest([data("ldh.png")], [data("ldh_mask.png")], [None],
                                                   [data("ldh.face.json").decode()], [0]))
    frame = ep.generate(GenerateOptions("a man", width=64, height=64, steps=2), tokens)
    assert sent and not any(n.startswith(("down_res", "mid_res")) for n in sent[0])
    ep.denoiser.send_zeros, sent[:] = True, []                   # as for a native engine: zeros sent, same frame
    assert np.array_equal(ep.generate(GenerateOptions("a man", width=64, height=64, steps=2), tokens), frame)
    assert "down_res_0" in sent[0] and "mid_res" in sent[0]
    ep.denoiser.send_zeros = False
    sent.clear()
    from storymaker_serve.runtime.preprocess import decode_image

    pose = decode_image(DATA / "two_people_pose.jpg")
    ep.generate(GenerateOptions("a man", width=64, height=64, steps=2, pose_image=pose), tokens)
    assert "down_res_0" in sent[0] and "mid_res" in sent[0]


@pytest.mark.parametrize("device,providers,gpus",
                         [("cpu", None, 1), ("cuda", None, 1), ("cuda", "tensorrt,cuda,cpu", 2)])
def test_deployment_sets_providers_instances_and_batch(built, tmp_path, device, providers, gpus):
    """export.build --device/--providers/--gpu-instances: the manifest records the deployment; the engine models'
    configs get KIND_GPU instances per GPU (KIND_CPU on the CPU) with max_batch_size inside the engine profile, and
    their onnxruntime sessions the providers in order with their options (the GPU ones written, not run here)."""
    from storymaker_serve.export.triton_config import parse_pbtxt
    from storymaker_serve.export.triton_repo import ENGINE_MODELS as COMPONENT_OF
    from storymaker_serve.runtime.manifest import Manifest
    from storymaker_serve.runtime.serving.engines import session_providers

    b = copy_build(built, tmp_path)
    argv = ["--weights", str(built / "demo_bundle"), "--out", str(b), "--device", device, "--gpu-instances", str(gpus)]
    assert build_main(argv + (["--providers", providers] if providers else [])) == 0
    m = Manifest(b)
    want = (providers or ("cuda,cpu" if device == "cuda" else "cpu")).split(",")
    assert m.deployment == {"device": device, "providers": want, "gpu_instances": gpus, "denoise_engines": "bls"}
    for repo in ("triton_repo", "triton_repo_ngc"):
        for name in ENGINE_MODELS:                       # the text encoders are engine models like the others
            cfg = parse_pbtxt((b / repo / name / "config.pbtxt").read_text())
            kind = "KIND_GPU" if device == "cuda" or repo == "triton_repo_ngc" else "KIND_CPU"
            assert cfg.instance_group[0].kind == getattr(type(cfg.instance_group[0]), kind), (repo, name)
            assert cfg.instance_group[0].count == (gpus if kind == "KIND_GPU" else 1)
            prof = m.component(COMPONENT_OF[name]).profile
            assert cfg.max_batch_size <= min(p["max"][0] for p in prof.values())
        sampler = parse_pbtxt((b / repo / "sampler" / "config.pbtxt").read_text())
        assert sampler.instance_group[0].kind == type(sampler.instance_group[0]).KIND_CPU   # BLS logic on the host
    names, options = session_providers(want, device_id=1, cache_dir="/c")
    assert names[-1] == "CPUExecutionProvider" and len(names) == len(want)
    if "tensorrt" in want:
        trt = options[names.index("TensorrtExecutionProvider")]
        assert trt["trt_engine_cache_enable"] == "1" and trt["trt_engine_cache_path"] == "/c"
        assert trt["device_id"] == "1"
    if "cuda" in want:
        assert options[names.index("CUDAExecutionProvider")]["device_id"] == "1"


def test_bad_deployment_flags_are_refused(built, tmp_path, capsys):
    b = tmp_path / "b"
    assert build_main(["--weights", str(built / "demo_bundle"), "--out", str(b), "--providers", "cuda,cpu"]) == 2
    assert "needs --device cuda" in capsys.readouterr().err
    assert build_main(["--weights", str(built / "demo_bundle"), "--out", str(b), "--device", "cuda",
                       "--providers", "rocm"]) == 2
    assert "use ['cpu', 'cuda', 'tensorrt']" in capsys.readouterr().err
