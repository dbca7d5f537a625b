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
