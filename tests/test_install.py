"""The installed form: a non-editable install of the wheel into a fresh venv gives working console scripts.

The fresh venv sees this venv's dependencies through a .pth file (nothing is downloaded again); the project
itself is installed from its wheel with the CPU extras and the constraints file, as a user would, and run
from a folder outside the checkout, so nothing of the checkout is importable there.
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

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "wheel"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp / "wheel").glob("storymaker_serve-*.whl"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_storymaker_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-build-isolation",
                        "-c", str(ROOT / "requirements" / "constraints.txt"), f"{wheel}[serve,kernel]"],
                       capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    return env_dir


def test_installed_layout_is_namespaced(installed):
    """No top-level runtime/export/kernels/benchmarks in site-packages; the Triton glue ships as package data."""
    py = installed / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name in ("runtime", "export", "kernels", "benchmarks", "triton_repo"):
        assert not (site / name).exists(), name
        assert (site / "storymaker_serve" / name).is_dir(), name
    assert (site / "storymaker_serve" / "triton_repo" / "storymaker.py").is_file()
    out = subprocess.run([str(py), "-c", "import storymaker_serve.runtime as r; print(r.__file__)"],
                         capture_output=True, text=True, cwd=installed, check=True).stdout
    assert str(site / "storymaker_serve" / "runtime") in out


def test_console_scripts_build_and_serve_the_demo(installed, tmp_path):
    """`storymaker-build --demo` builds (ONNX, parity, Triton repository with the installed glue) and
    `storymaker-serve` serves it until SIGTERM; `--help` of every script shows defaults and starts nothing."""
    import tritonclient.grpc as grpcclient

    from storymaker_serve.runtime.serving.ports import free_port

    bin_ = installed / "bin"
    for script in ("build", "serve", "client", "generate", "bench", "refit"):
        r = subprocess.run([str(bin_ / f"storymaker-{script}"), "--help"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, (script, r.stderr[-500:])
    r = subprocess.run([str(bin_ / "storymaker-build"), "--demo", "--out", str(tmp_path / "b")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    glue = (tmp_path / "b" / "triton_repo" / "storymaker" / "1" / "model.py").read_text()
    assert "from storymaker_serve." in glue
    port = free_port()
    srv = subprocess.Popen([str(bin_ / "storymaker-serve"), "--repo", str(tmp_path / "b" / "triton_repo"),
                            "--grpc-port", str(port), "--http-port", str(free_port()), "--metrics-port", str(free_port())],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": ""})
    try:
        client, deadline = grpcclient.InferenceServerClient(f"127.0.0.1:{port}"), time.time() + 240
        ready = False
        while time.time() < deadline and srv.poll() is None and not ready:
            try:
                ready = client.is_server_ready() and client.is_model_ready("storymaker")
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(1)
        assert ready, srv.stdout.read() if srv.poll() is not None else "not ready in time"
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=60)
    assert srv.returncode == 0
