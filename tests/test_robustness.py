"""Operator-facing robustness of the served deployment: the launcher never orphans tritonserver; hostile or
oversized requests get a clear, correctly coded error for that request only, are refused cheaply, and the
server keeps serving."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _server_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if name == "tritonserver" and ppid == parent:
            pids.append(int(stat.parent.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _launch(built):
    from runtime.serving.launcher import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--repo", str(built / "triton_repo"),
                             "--grpc-port", str(port), "--http-port", str(free_port()), "--metrics-port", str(free_port())],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def test_sigkill_while_serving_leaves_no_server(built):
    import tritonclient.grpc as grpcclient

    proc, server, port = _launch(built)
    client, deadline = grpcclient.InferenceServerClient(f"127.0.0.1:{port}"), time.time() + 240
    while time.time() < deadline:
        try:
            if client.is_server_ready():
                break
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    else:
        pytest.fail("server not ready")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _gone(server), f"tritonserver {server} kept running after its launcher was killed"
