"""The processes of a deployment: the launcher never orphans tritonserver or its Python-backend stubs, whether it
is stopped with SIGTERM while starting or killed with SIGKILL while the models load or serve."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _server_pids(parent: int) -> list[int]:
    from storymaker_serve.benchmarks.processes import child_pids

    return child_pids(parent, "tritonserver", recursive=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _launch(built):
    from storymaker_serve.runtime.serving.ports import free_port

    port = free_port()
    out = tempfile.NamedTemporaryFile("w+", prefix="launcher-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--repo", str(built / "triton_repo"),
                             "--grpc-port", str(port), "--http-port", str(free_port()),
                             "--metrics-port", str(free_port())],
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    proc.output = Path(out.name)            # what the launcher printed: the reason when it exits early
    deadline, pids = time.time() + 60, []
    while time.time() < deadline and not pids:
        pids = _server_pids(proc.pid)
        time.sleep(0.1)
    assert pids, "the launcher started no tritonserver"
    return proc, pids[0], port


def _gone(pid: int, within: float = 40.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_sigterm_while_starting_stops_the_server(built):
    proc, server, port = _launch(built)
    import tritonclient.grpc as grpcclient

    try:
        ready = grpcclient.InferenceServerClient(f"127.0.0.1:{port}").is_server_ready()
    except Exception:  # noqa: BLE001 - not listening yet: still starting, as intended
        ready = False
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert _gone(server), f"tritonserver {server} outlived its launcher (ready when signalled: {ready})"


@pytest.mark.slow
def test_sigkill_while_serving_leaves_no_server(built):
    from storymaker_serve.runtime.serving.launcher import wait_until_ready

    proc, server, port = _launch(built)
    assert wait_until_ready(f"127.0.0.1:{port}", 240, proc), f"server not ready: {proc.output.read_text()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _gone(server), f"tritonserver {server} kept running after its launcher was killed"


@pytest.mark.slow
@pytest.mark.parametrize("with_server", [False, True], ids=["launcher", "launcher+tritonserver"])
def test_sigkill_while_models_load_leaves_no_process(built, with_server):
    """The launcher SIGKILLed while the Python-backend stubs load (and tritonserver with it, as the OOM killer
    might): its reaper, tritonserver and every stub are gone within 30 s (the reaper's PDEATHSIG, its grace, then
    its subreaper sweep of the orphaned stubs)."""
    from storymaker_serve.benchmarks.processes import child_pids

    proc, server, port = _launch(built)
    deadline = time.time() + 60
    while time.time() < deadline and not child_pids(server):      # the first stub: models are loading
        time.sleep(0.02)
    assert child_pids(server), "tritonserver started no Python-backend stub"
    family = {server, *child_pids(proc.pid, recursive=True)}
    os.kill(proc.pid, signal.SIGKILL)
    if with_server:
        os.kill(server, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 30
    while time.time() < deadline:
        alive = {p for p in family if _alive(p)}
        for p in alive:                              # stubs started after the kill, or re-parented
            family |= set(child_pids(p, recursive=True))
        if not {p for p in family if _alive(p)}:
            return
        time.sleep(0.2)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in family if _alive(p)}
    pytest.fail(f"30 s after the launcher was killed during model load, processes remain: {left}")
