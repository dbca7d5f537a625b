"""The installed form, two ways.

- Fast: the wheel goes into a fresh venv that sees this venv's packages through a .pth file (nothing is
  downloaded again): the layout in site-packages and every console script's --help.
- Honest (slow): a fresh venv gets exactly requirements/lock.txt (which holds the PyPI package `kernels` that
  transformers imports) and the wheel with no dependency resolution, as the README tells users; from a folder
  outside the checkout, `storymaker-build --demo` builds and `storymaker-serve` serves a frame.
"""
import os
import signal
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from helpers import STORY

from storymaker_serve.runtime.serving.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _wheel(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "wheel"), str(ROOT)], check=True, capture_output=True)
    return next((tmp / "wheel").glob("storymaker_serve-*.whl"))


def _site(py: Path) -> Path:
    return Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())


@pytest.fixture(scope="module")
def borrowed(tmp_path_factory) -> Path:
    """A venv with the wheel installed and this venv's packages borrowed through a .pth file."""
    tmp = tmp_path_factory.mktemp("install")
    wheel = _wheel(tmp)
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    (_site(py) / "_storymaker_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                       capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    return env_dir


def test_installed_layout_is_one_package(borrowed):
    """Only `storymaker_serve` in site-packages (no top-level runtime/export/kernels/benchmarks); the Triton glue
    ships inside it; its modules load once, under the package's name."""
    py = borrowed / "bin" / "python"
    site = _site(py)
    for name in ("runtime", "export", "kernels", "benchmarks", "triton_repo"):
        assert not (site / name).exists(), name
        assert (site / "storymaker_serve" / name).is_dir(), name
    assert (site / "storymaker_serve" / "triton_repo" / "storymaker.py").is_file()
    code = ("import sys, storymaker_serve.runtime.serving.client as c; "
            "print(c.__file__); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('runtime', 'export', 'benchmarks')))")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=borrowed, check=True).stdout
    assert str(site / "storymaker_serve" / "runtime") in out and out.strip().endswith("[]"), out


def test_console_scripts_show_help(borrowed, tmp_path):
    for script in ("build", "serve", "client", "generate", "bench", "refit"):
        r = subprocess.run([str(borrowed / "bin" / f"storymaker-{script}"), "--help"], capture_output=True,
                           text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: storymaker-{script} "), (script, r.stderr[-500:])
        assert "examples:" in r.stdout and f"storymaker-{script} " in r.stdout.split("examples:")[1], script


@pytest.fixture(scope="module")
def from_lock(tmp_path_factory) -> Path:
    """A fresh venv with exactly the lock, then the wheel, neither resolving anything."""
    tmp = tmp_path_factory.mktemp("lock_install")
    wheel = _wheel(tmp)
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    for args in (["--require-hashes", "-r", str(LOCK)], [str(wheel)]):
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *args], capture_output=True,
                           text=True, cwd=tmp, timeout=1500)
        assert r.returncode == 0, r.stderr[-3000:]
    return env_dir


@pytest.mark.slow
def test_lock_install_imports_the_real_kernels_package(from_lock):
    """transformers >= 5.25 imports the PyPI package `kernels`; nothing of ours may stand in its place."""
    py = from_lock / "bin" / "python"
    code = ("import kernels, storymaker_serve.envcheck as e; from transformers.integrations import hub_kernels; "
            "print(kernels.__file__); raise SystemExit(e.main())")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=from_lock,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert str(_site(py) / "kernels") in r.stdout


@pytest.mark.slow
def test_lock_install_builds_and_serves_the_demo(from_lock, tmp_path):
    """From a folder outside the checkout: `storymaker-build --demo`, then `storymaker-serve` answers a frame."""
    bin_, env = from_lock / "bin", {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(bin_ / "storymaker-build"), "--demo", "--out", str(tmp_path / "b")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    glue = (tmp_path / "b" / "triton_repo" / "storymaker" / "1" / "model.py").read_text()
    assert "from storymaker_serve." in glue
    port = free_port()
    srv = subprocess.Popen([str(bin_ / "storymaker-serve"), "--repo", str(tmp_path / "b" / "triton_repo"),
                            "--grpc-port", str(port), "--http-port", str(free_port()),
                            "--metrics-port", str(free_port())],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    try:
        client, deadline = grpcclient.InferenceServerClient(f"127.0.0.1:{port}"), time.time() + 300
        ready = False
        while time.time() < deadline and srv.poll() is None and not ready:
            try:
                ready = client.is_server_ready() and client.is_model_ready("storymaker")
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(1)
        assert ready, srv.stdout.read() if srv.poll() is not None else "not ready in time"
        r = subprocess.run([str(bin_ / "storymaker-client"), str(STORY), "--url",
                            f"127.0.0.1:{port}", "--steps", "2", "--width", "64", "--height", "64", "--out",
                            str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert len(list((tmp_path / "out").glob("frame_*.png"))) == 3
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=60)
    assert srv.returncode == 0
