"""Ports and malloc settings of the launched server (and the client's malloc settings). Ports: drawn outside the
kernel's ephemeral range and never twice; a port the operator
chose that is taken fails at once with its flag named; a port the launcher drew that was taken before
tritonserver bound it is drawn again. The starts run the real tritonserver on a one-model repository."""
import random
import socket
from pathlib import Path

import pytest

from storymaker_serve.runtime.errors import StoryMakerError
from storymaker_serve.runtime.serving import launcher
from storymaker_serve.runtime.serving.launcher import TritonServer
from storymaker_serve.runtime.serving.ports import ephemeral_range, free_port, is_free, reserve, taken_port

ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
"""
# what tritonserver 2.51 logged when a port it was given was taken (one line each, from real runs)
TAKEN_LINES = {
    41001: "E1124 18:33:13.046752 8652 main.cc:245] \"failed to start GRPC service: Unavailable - Socket "
           "'127.0.0.1:41001' already in use \"",
    38463: "E1124 18:32:49.519979 7933 main.cc:257] \"failed to start HTTP service: Unavailable - Socket "
           "'127.0.0.1:38463' already in use \"",
    44289: "E1124 18:31:40.558010 7070 main.cc:293] \"failed to start Metrics service: Unavailable - Socket "
           "'127.0.0.1:44289' already in use \"",
}


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("ports") / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return repo


def _listen(port: int, address: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((address, port))
    s.listen()
    return s


def test_free_ports_avoid_the_ephemeral_range_reserved_and_repeated_ports():
    lo, _ = ephemeral_range()
    held = _listen(0)
    reserve(held.getsockname()[1], 20001)
    try:
        ports = [free_port() for _ in range(50)]
        assert len(set(ports)) == 50
        assert 20001 not in ports and held.getsockname()[1] not in ports
        if lo - 10000 >= 1000:
            assert all(10000 <= p < lo for p in ports), "a drawn port inside the ephemeral range"
        assert all(is_free(p) for p in ports)
        assert not is_free(held.getsockname()[1])
        if lo - 10000 >= 1000:                             # a draw that lands on a taken port draws again
            first = random.Random(7).randrange(10000, lo)
            taken = _listen(first)
            try:
                assert free_port(rng=random.Random(7)) != first
            finally:
                taken.close()
    finally:
        held.close()


def test_taken_port_is_read_from_the_server_log():
    for port, line in TAKEN_LINES.items():
        assert taken_port("I1124 startup ...\n" + line + "\nI1124 Non-graceful termination detected.") == port
    assert taken_port("E1124 failed to load model 'unet'") is None


@pytest.mark.slow
def test_an_operator_port_that_is_taken_fails_before_any_server_starts(echo_repo, monkeypatch):
    started = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("started"))
    for flag, kwarg in (("--metrics-port", "metrics_port"), ("--grpc-port", "grpc_port"), ("--http-port", "http_port")):
        held = _listen(free_port())
        port = held.getsockname()[1]
        try:
            srv = TritonServer(echo_repo, required_models=[], **{kwarg: port})
            with pytest.raises(StoryMakerError) as e:
                srv.start(30)
            assert f"port {port} ({flag})" in str(e.value) and "already in use" in str(e.value)
        finally:
            held.close()
    assert not started


@pytest.mark.slow
def test_a_drawn_port_taken_before_the_server_binds_it_is_drawn_again(echo_repo, capfd):
    import tritonclient.grpc as g

    srv = TritonServer(echo_repo, required_models=[])
    blocker = _listen(srv.upstream_http_port)          # taken after it was drawn, as a client's connection could
    taken = srv.upstream_http_port
    try:
        srv.start(120)
        try:
            assert srv.upstream_http_port != taken
            assert g.InferenceServerClient(srv.url).is_model_ready("echo")
        finally:
            srv.stop()
    finally:
        blocker.close()
    assert f"port {taken} was taken before tritonserver bound it" in capfd.readouterr().err


@pytest.mark.slow
def test_an_operator_port_taken_while_the_models_load_is_named(echo_repo, monkeypatch):
    held = _listen(free_port())
    port = held.getsockname()[1]
    monkeypatch.setattr(launcher, "is_free", lambda *a: True)     # taken after the check, while models load
    try:
        srv = TritonServer(echo_repo, metrics_port=port, required_models=[])
        with pytest.raises(StoryMakerError, match=rf"port {port} \(--metrics-port\) on 127.0.0.1 is already in use"):
            srv.start(120)
        assert srv.proc.poll() is not None
    finally:
        held.close()


@pytest.mark.slow
def test_the_server_and_its_stubs_get_the_malloc_settings(echo_repo, monkeypatch):
    """runtime/serving/malloc.py: tritonserver and its Python-backend stubs run with the thresholds (an operator's
    own MALLOC_* value is kept); STORYMAKER_MALLOC_TUNING=0 leaves them out."""
    from storymaker_serve.benchmarks.processes import child_pids
    from storymaker_serve.runtime.serving import malloc

    def environ(pid):
        return dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)

    for k in (*malloc.VARS, "STORYMAKER_MALLOC_TUNING"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1234567")              # the operator's
    with TritonServer(echo_repo, required_models=[]) as srv:
        stubs = child_pids(srv.server_pid)
        assert stubs, "no Python-backend stub"
        for pid in [srv.server_pid, *stubs]:
            env = environ(pid)
            assert env[b"MALLOC_MMAP_THRESHOLD_"] == str(malloc.MMAP_THRESHOLD).encode()
            assert env[b"MALLOC_TRIM_THRESHOLD_"] == b"1234567"
    assert malloc.env({"STORYMAKER_MALLOC_TUNING": "0"}) == {}
    assert malloc.env({}) == {k: str(v) for k, v in malloc.VARS.items()}


def test_mallopt_in_a_running_process_unless_turned_off_or_set():
    import subprocess
    import sys

    code = ("from storymaker_serve.runtime.serving import malloc; import os; "
            "print(malloc.tune_this_process({}), malloc.tune_this_process({'STORYMAKER_MALLOC_TUNING': '0'}), "
            "malloc.tune_this_process({'MALLOC_MMAP_THRESHOLD_': '1'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                       timeout=60)
    assert r.stdout.split() == ["True", "False", "False"], r.stderr


def test_the_client_sets_the_malloc_thresholds_only_when_asked(monkeypatch):
    """A library must not change its host process's malloc settings by default; the CLI asks for them."""
    from storymaker_serve.runtime.serving import client as client_mod

    calls = []
    monkeypatch.setattr(client_mod.malloc, "tune_this_process", lambda: calls.append(1) or True)
    client_mod.StoryMakerClient("127.0.0.1:1")
    assert calls == []
    client_mod.StoryMakerClient("127.0.0.1:1", tune_malloc=True)
    assert calls == [1]


@pytest.mark.slow
def test_without_the_gateway_on_a_specific_address_the_server_becomes_ready(echo_repo):
    """Readiness asks tritonserver's own HTTP port where it listens: on `address` itself without the gateway
    (127.0.0.2 is a loopback address other than 127.0.0.1, so asking 127.0.0.1 finds nothing there)."""
    import tritonclient.grpc as g

    srv = TritonServer(echo_repo, address="127.0.0.2", gateway=False, required_models=[])
    try:
        srv.start(30)
        assert g.InferenceServerClient(srv.url).is_model_ready("echo")
    finally:
        srv.stop()
