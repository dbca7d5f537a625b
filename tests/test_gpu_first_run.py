"""A first GPU deployment, pinned on a CPU: BLS outputs asked for in host memory, GPU execution providers that
must really be there, and the TensorRT execution provider given the component's profile."""
import numpy as np
import onnxruntime as ort
import pytest

from storymaker_serve.runtime.errors import DeploymentError
from storymaker_serve.runtime.manifest import Manifest
from storymaker_serve.runtime.serving.engines import OrtEngine, require_providers, session_providers
from storymaker_serve.runtime.serving.glue import Glue


class _GpuPb:
    """The slice of triton_python_backend_utils a BLS call uses, for an engine model that runs on a GPU: its
    outputs come back in GPU memory unless the request prefers CPU memory, and as_numpy() then refuses them as
    pb_tensor.cc does."""

    TRITONSERVER_MEMORY_CPU, TRITONSERVER_MEMORY_GPU = 0, 2
    requests: list = []

    class PreferredMemory:
        def __init__(self, memory_type, device_id=0):
            self.memory_type, self.device_id = memory_type, device_id

    class Tensor:
        def __init__(self, name, array, on_gpu=False):
            self.name, self.array, self.on_gpu = name, array, on_gpu

        def as_numpy(self):
            if self.on_gpu:
                raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy.")
            return self.array

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
            self.outputs, self.preferred = requested_output_names, preferred_memory
            _GpuPb.requests.append(self)

        def exec(self):
            on_gpu = self.preferred is None or self.preferred.memory_type != _GpuPb.TRITONSERVER_MEMORY_CPU
            return _GpuResponse({o: _GpuPb.Tensor(o, np.ones(2, np.float32), on_gpu) for o in self.outputs})

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return response.tensors[name]


class _GpuResponse:
    def __init__(self, tensors):
        self.tensors = tensors

    def has_error(self):
        return False


def test_bls_outputs_are_asked_for_in_cpu_memory():
    """Every BLS caller reads numpy, so every call asks for CPU outputs; without it a GPU engine model's answer
    cannot be read (what every NGC request hit)."""
    out = Glue(_GpuPb).engine("unet", {"sample": np.zeros((2, 4, 8, 8), np.float32)}, ["noise_pred"], batched=True)
    assert out["noise_pred"].tolist() == [1.0, 1.0]
    assert _GpuPb.requests[-1].preferred.memory_type == _GpuPb.TRITONSERVER_MEMORY_CPU
    no_preference = _GpuPb.InferenceRequest("unet", ["noise_pred"], [])         # what the glue sent before
    with pytest.raises(RuntimeError, match="stored in GPU"):
        _GpuPb.get_output_tensor_by_name(no_preference.exec(), "noise_pred").as_numpy()


def test_a_stub_without_preferred_memory_still_works():
    class OldPb(_GpuPb):
        PreferredMemory = None

    assert Glue(OldPb)._cpu_outputs() == {}


def test_a_missing_gpu_provider_is_refused_at_load(built):
    """This CPU onnxruntime has no CUDA provider: a session that asks for it would run on the CPU with a warning
    and fail at the first bound request; the engine refuses to load and names the package."""
    assert "CUDAExecutionProvider" not in ort.get_available_providers()
    m = Manifest(built)
    rec = m.component("vae_decoder")
    with pytest.raises(DeploymentError, match=r"vae_decoder: the deployment asks for CUDAExecutionProvider.*"
                                              r"onnxruntime-gpu"):
        OrtEngine(m.file(rec.model_file), rec, providers=("cuda", "cpu"))
    OrtEngine(m.file(rec.model_file), rec, providers=("cpu",))                  # the CPU deployment loads


def test_a_session_that_silently_fell_back_is_refused():
    """Available but not taken (a CUDA library missing at session creation): the session's own provider list
    decides."""
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    require_providers(wanted, wanted, "unet", session=True)
    with pytest.raises(DeploymentError, match="the session got only CPUExecutionProvider"):
        require_providers(wanted, ["CPUExecutionProvider"], "unet", session=True)
    require_providers(["CPUExecutionProvider"], ["CPUExecutionProvider"], "unet")


def test_tensorrt_provider_gets_the_component_profile(built):
    """One explicit optimisation profile from the spec (min/opt/max per input), so the TensorRT EP builds one
    engine for the whole range instead of one per new shape."""
    prof = Manifest(built).component("unet").profile
    _, options = session_providers(["tensorrt", "cuda", "cpu"], 0, "/cache", prof)
    trt = options[0]
    for key, which in (("trt_profile_min_shapes", "min"), ("trt_profile_opt_shapes", "opt"),
                       ("trt_profile_max_shapes", "max")):
        entries = dict(e.split(":") for e in trt[key].split(","))
        assert set(entries) == set(prof)
        assert entries["sample"] == "x".join(str(d) for d in prof["sample"][which])
    assert "trt_profile_min_shapes" not in session_providers(["tensorrt"], 0, "/cache")[1][0]


def test_exact_fp32_turns_off_tf32_for_matmuls_and_convolutions():
    """The GPU parity tests' fp32 reference: TF32 off for both cuBLAS and cuDNN (convolutions default to TF32),
    and the settings restored after."""
    import torch
    from helpers import exact_fp32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    with exact_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.allow_tf32 is True
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _engine_build(monkeypatch, gpu: dict, built_calls: list):
    """TensorRT 'available' with a stand-in builder on a stand-in GPU."""
    import storymaker_serve.export.tensorrt as trt_mod

    def fake_build(plan):
        built_calls.append(plan.component)
        plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
        plan.engine_path.write_bytes(plan.component.encode())
        return plan.engine_path

    monkeypatch.setattr(trt_mod, "availability", lambda: (True, "ok"))
    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: "10.8.0")
    monkeypatch.setattr(trt_mod, "gpu_identity", lambda: gpu)
    monkeypatch.setattr(trt_mod, "build_engine", fake_build)


@pytest.mark.slow
def test_engines_are_kept_per_gpu_and_never_dropped_by_a_rebuild(built, tmp_path, monkeypatch, capsys):
    """Engine keys and records hold the GPU's compute capability: a rebuild on another GPU builds them again
    instead of calling them cached; a rebuild without TensorRT, or with --engines off, keeps built engines."""
    import json

    from helpers import copy_build

    import storymaker_serve.export.tensorrt as trt_mod
    from storymaker_serve.export.build import main as build_main

    b, calls = copy_build(built, tmp_path), []
    args = ["--weights", str(built / "demo_bundle"), "--out", str(b)]
    _engine_build(monkeypatch, {"gpu": "NVIDIA A100", "compute_capability": "8.0"}, calls)
    assert build_main(args) == 0
    engines = {n: c["engine"] for n, c in json.loads((b / "manifest.json").read_text())["components"].items()}
    assert engines["unet"]["compute_capability"] == "8.0" and engines["unet"]["gpu"] == "NVIDIA A100"
    first = len(calls)
    assert build_main(args) == 0 and len(calls) == first                     # same GPU: cached
    monkeypatch.setattr(trt_mod, "gpu_identity", lambda: {"gpu": "NVIDIA H200", "compute_capability": "9.0"})
    assert build_main(args) == 0 and len(calls) == 2 * first                 # another GPU: built again
    for no_trt in (["--engines", "off"], []):
        monkeypatch.setattr(trt_mod, "availability", lambda: (False, "no CUDA GPU is visible"))
        assert build_main(args + no_trt) == 0
        m = json.loads((b / "manifest.json").read_text())
        assert all(c["engine"]["status"] == "built" and c["engine"]["compute_capability"] == "9.0"
                   for c in m["components"].values()), no_trt
    capsys.readouterr()


def test_the_ngc_command_checks_the_gpu_and_tensorrt_here(built, tmp_path, monkeypatch):
    """By default (no --container-tensorrt) the engines are checked against the TensorRT and the GPU where the
    command runs: engines for another compute capability or TensorRT are refused with the fix."""
    import json

    from helpers import copy_build

    import storymaker_serve.runtime.serving.ngc as ngc

    b = copy_build(built, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    for c in m["components"].values():
        c["engine"] = {"status": "built", "path": "engines/x.plan", "tensorrt": "10.8.0", "version_compatible": False,
                       "compute_capability": "8.0", "hardware_compatibility": "none"}
    (b / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(ngc, "tensorrt_version", lambda: None)
    monkeypatch.setattr(ngc, "gpu_identity", lambda: {"gpu": "NVIDIA H200", "compute_capability": "9.0"})
    with pytest.raises(DeploymentError, match=r"built for compute capability \['8.0'\] but this GPU \(NVIDIA H200\) "
                                              r"is 9.0.*--trt-hardware-compat ampere\+"):
        ngc.ngc_command(b)
    monkeypatch.setattr(ngc, "gpu_identity", lambda: {"gpu": "NVIDIA A100", "compute_capability": "8.0"})
    cmd, notes = ngc.ngc_command(b)
    assert any("NVIDIA A100" in n for n in notes)
    monkeypatch.setattr(ngc, "tensorrt_version", lambda: "10.9.0")            # the TensorRT installed here
    with pytest.raises(DeploymentError, match="TensorRT 10.9.0 cannot load the engines"):
        ngc.ngc_command(b)


def test_noise_on_the_gpu_is_an_option_with_a_clear_error_elsewhere(monkeypatch):
    """The release draws its starting noise with torch.Generator(device="cuda"): noise_device="cuda" does the same
    (the release's images for a seed); the CPU default stays portable. Without a GPU the option is refused."""
    import torch

    import storymaker_serve.runtime.denoise as denoise_mod
    from storymaker_serve.runtime.errors import InputError
    from storymaker_serve.runtime.pipeline import GenerateOptions

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="noise_device cuda needs a CUDA GPU"):
            GenerateOptions("x", noise_device="cuda").validate()
    with pytest.raises(InputError, match="noise_device 'tpu'"):
        GenerateOptions("x", noise_device="tpu").validate()
    asked, real = [], torch.Generator
    monkeypatch.setattr(denoise_mod.torch, "Generator", lambda device="cpu": asked.append(device) or real("cpu"))
    denoise_mod.noise_generator(3, "cuda")
    assert asked == ["cuda"]


@pytest.mark.gpu
def test_cuda_noise_is_the_releases_noise():
    import torch

    from storymaker_serve.runtime.denoise import initial_latents, noise_generator

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ours = initial_latents(7, 64, 64, 4, 8, noise_generator(7, "cuda"))
    release = torch.randn((1, 4, 8, 8), generator=torch.Generator(device="cuda").manual_seed(7), device="cuda")
    assert ours.device.type == "cuda" and torch.equal(ours, release)
    assert not torch.equal(ours.cpu(), initial_latents(7, 64, 64, 4, 8))


@pytest.mark.slow
def test_an_in_place_refit_updates_the_manifest(built, tmp_path, monkeypatch, capsys):
    """After `export.refit` replaces the build's UNet engine, the manifest's LoRA scale and the engine record (hash,
    the ONNX it was refitted from, that export's key) describe the new engine, not the old one."""
    import json

    from helpers import copy_build

    import storymaker_serve.export.refit as refit

    b = copy_build(built, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    (b / "engines").mkdir(exist_ok=True)
    (b / "engines" / "unet.plan").write_bytes(b"old engine")
    m["components"]["unet"]["engine"] = {"status": "built", "path": "engines/unet.plan", "refittable": True,
                                         "tensorrt": "10.8.0", "version_compatible": False, "sha256": "old"}
    (b / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(refit, "availability", lambda: (True, "ok"))

    def fake_refit(engine, onnx_path, out=None, version_compatible=False):
        engine.write_bytes(b"refitted at 0.6")
        return engine

    monkeypatch.setattr(refit, "refit_engine", fake_refit)
    assert refit.main(["--build", str(b), "--weights", str(built / "demo_bundle"), "--lora-scale", "0.6"]) == 0
    after = json.loads((b / "manifest.json").read_text())
    eng = after["components"]["unet"]["engine"]
    assert after["lora_scale"] == 0.6 and eng["refit"]["lora_scale"] == 0.6
    assert eng["sha256"] != "old" and eng["bytes"] == len(b"refitted at 0.6")
    assert eng["refit"]["onnx"].startswith("refit/") and eng["refit"]["component_key"]
    capsys.readouterr()


def test_device_check_dry_run_fits_its_budget_and_checks_the_wheels(tmp_path, capsys):
    """The GPU device check's plan fits 8 minutes, and its dry run says which carried wheel is missing and when the
    wheels exceed the 64 MiB that can travel with the checkout."""
    from storymaker_serve.benchmarks import device_check as dc

    wheels = tmp_path / ".whl"
    wheels.mkdir()
    want = dc.wanted_wheels()
    assert {"diffusers", "transformers", "insightface"} <= set(want)
    for name, version in want.items():
        (wheels / f"{name}-{version}-py3-none-any.whl").write_bytes(b"x" * 1000)
    [row] = dc.main(["--out", str(tmp_path / "o"), "--dry-run", "--wheels", str(wheels)])
    assert row["wheel_problems"] == [] and row["budget_s"] <= 8 * 60 and not (tmp_path / "o").exists()
    assert row["fit"][:3] == ["parity", "e2e", "kernel"]             # the figures that matter most fit the budget
    assert "the 470 s budget covers parity, e2e, kernel" in capsys.readouterr().out
    (wheels / "diffusers-0.42.1-py3-none-any.whl").unlink()
    with open(wheels / "huge-1.0-py3-none-any.whl", "wb") as f:
        f.truncate(65 << 20)
    problems = dc.check_wheels(wheels)
    assert any("diffusers==0.42.1 missing" in p for p in problems)
    assert any("over the 64 MiB budget" in p for p in problems)


def test_device_check_wheels_are_the_locks_versions():
    """The carried wheels are the versions the suite passes with (requirements/lock.txt)."""
    import re

    from storymaker_serve.benchmarks import device_check as dc

    lock = dc.CHECKOUT / "requirements" / "lock.txt"
    pins = {re.sub(r"[-_.]+", "_", n).lower(): v for n, v in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", lock.read_text(),
                                                                        re.M)}
    assert {n: pins[n] for n in dc.wanted_wheels()} == dc.wanted_wheels()
