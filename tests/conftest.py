"""Shared fixtures: the demo bundle (written once per test run) and loaded models.

Everything runs offline on a CPU: HF_HUB_OFFLINE is set before any
huggingface import, and all weights come from the demo bundle that our own
code writes in the real formats.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # OpenAI Triton kernels run on CPU tensors through Triton's interpreter; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import time
from pathlib import Path

import psutil
import pytest
from helpers import DATA

# Fixtures that start a real tritonserver or install the package into a fresh venv: a test that uses one is slow
# (`pytest -m "not slow"` is the inner loop; `make test` runs everything).
SLOW_FIXTURES = {"server", "client", "echo_repo", "from_lock", "borrowed"}


# A server's processes (tritonserver, its Python-backend stubs): the suite fails if it leaves one behind.
SERVER_PROCESSES = ("tritonserver", "triton_python_backend_stub")
_STARTED = time.time()


def _left_behind() -> list[psutil.Process]:
    """Server processes started during this test run that are still ours (below this process) or orphaned."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    out = []
    for p in psutil.process_iter(["name", "cmdline", "create_time", "ppid"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if (p.info["create_time"] or 0) >= _STARTED - 1 and (p.pid in mine or p.info["ppid"] == 1) \
                and any(n in (p.info["name"] or "") or n in cmd for n in SERVER_PROCESSES):
            out.append(p)
    return out


def pytest_sessionfinish(session, exitstatus):
    """After every fixture is torn down: no tritonserver or stub of ours may outlive the suite (30 s grace)."""
    deadline, left = time.time() + 30, _left_behind()
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = _left_behind()
    if left:
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            "FAILED: the suite left server processes running (killed now): "
            + "; ".join(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:100]}" for p in left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    from storymaker_serve.export.demo_bundle import write_demo_bundle

    return write_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo")


@pytest.fixture(scope="session")
def layout(bundle):
    from storymaker_serve.runtime.weights import WeightsLayout

    return WeightsLayout.from_dir(bundle)


@pytest.fixture(scope="session")
def models(layout):
    """Fused StoryMaker models (the production path)."""
    from storymaker_serve.runtime.loaders import load_storymaker

    torch.manual_seed(0)
    return load_storymaker(layout, lora_scale=0.8, ip_scale=0.8, fuse=True)


@pytest.fixture(scope="session")
def pipe(models):
    from storymaker_serve.runtime.pipeline import StoryMakerPipeline

    return StoryMakerPipeline(models)


@pytest.fixture(scope="session")
def two_characters():
    from storymaker_serve.runtime.characters import Character

    return [Character.load(DATA / "ldh.png", DATA / "ldh_mask.png", DATA / "ldh.face.json", name="man"),
            Character.load(DATA / "tsy.png", DATA / "tsy_mask.png", DATA / "tsy.face.json", name="woman")]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """`python -m export.build --demo` once per test run: ONNX, manifest and Triton repository."""
    from storymaker_serve.export.build import main

    out = tmp_path_factory.mktemp("build") / "demo"
    assert main(["--demo", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def server(built):
    """A real tritonserver on loopback serving the demo build, shared by the serving test modules."""
    from storymaker_serve.runtime.serving.launcher import TritonServer

    with TritonServer(built / "triton_repo") as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    from storymaker_serve.runtime.serving.client import StoryMakerClient

    return StoryMakerClient(server.url, retries=2)
