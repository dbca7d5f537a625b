"""`python -m storymaker_serve.runtime.serving.reaper CMD...`: runs tritonserver and takes everything it started
down with it.

tritonserver starts a Python-backend stub process per model instance. When the server dies abruptly (its launcher
killed while the models load), the stubs are orphaned to init and live on, holding memory and shared-memory
regions. This process sits between the launcher and tritonserver (Linux): it is a child subreaper, so orphaned
stubs become its children; it stops with its launcher (PR_SET_PDEATHSIG), even one killed by SIGKILL; on SIGTERM
or SIGINT it asks tritonserver to stop, and kills it after GRACE_S (ORPHAN_GRACE_S when the launcher is gone, so
nothing of the deployment outlives it by more than that); once tritonserver is gone it kills every process left
under it. It exits with tritonserver's exit code.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

GRACE_S, ORPHAN_GRACE_S = 25.0, 10.0
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value)
    except (OSError, AttributeError):           # not Linux: the launcher's own stop() covers clean exits
        pass


def kill_descendants() -> None:
    """SIGKILL every process below this one (with the subreaper flag, orphaned stubs are among them), then reap."""
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break


def main(argv: list[str]) -> int:
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    launcher = os.getppid()
    if launcher == 1:                             # the launcher died before the flag was set
        return 1
    server = subprocess.Popen(argv)
    stop_at: list[float] = []

    def stop(*_):
        if not stop_at:
            stop_at.append(time.monotonic() + (GRACE_S if os.getppid() == launcher else ORPHAN_GRACE_S))
            try:
                server.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while server.poll() is None:
        if stop_at and time.monotonic() > stop_at[0]:
            server.kill()
        try:
            server.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    kill_descendants()
    return server.returncode if server.returncode >= 0 else 128 - server.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
