"""`python -m runtime.serve --repo PATH`: start a real Triton Inference Server on a StoryMaker repository.

Uses a `tritonserver` on PATH if there is one (an NGC container), otherwise
the binary shipped in the `nvidia-pytriton` wheel: it sets LD_LIBRARY_PATH to
the wheel's libraries and libpython's folder, and copies the Python backend
plus its 3.x stub into a private backend folder. Secure defaults: loopback
addresses, model control mode `none` (no remote model loading, which would run
arbitrary code), and the administrative protocols (model repository, shared
memory, trace, logging) restricted to clients that send the operator's key in
the `admin-key` header (gRPC clients send it as `triton-grpc-protocol-admin-key`). `TritonServer` is also a
context manager for tests and the demo; it waits for readiness and stops the process it started on exit.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from storymaker_serve.runtime.cli import argument_parser, configure_logging
from storymaker_serve.runtime.errors import StoryMakerError
from storymaker_serve.runtime.serving import malloc, reaper
from storymaker_serve.runtime.serving.gateway import Gateway, repo_message_limit
from storymaker_serve.runtime.serving.ngc import ngc_command
from storymaker_serve.runtime.serving.ports import PortTaken, free_port, is_free, reserve, taken_message, taken_port

REQUIRED_MODELS = ("text_encoder", "text_encoder_1", "text_encoder_2", "clip_vision", "ppr", "encode_characters",
                   "unet", "vae_decoder", "sampler", "storymaker")
ADMIN_PROTOCOLS = "model-repository,shared-memory,trace,logging"
PORT_FLAGS = {"grpc_port": "--grpc-port", "http_port": "--http-port", "metrics_port": "--metrics-port"}
PORT_NAMES = (*PORT_FLAGS, "upstream_grpc_port", "upstream_http_port")
PORT_ATTEMPTS = 3


PLATFORMS = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime"}


def repo_backends(repo: Path) -> dict[str, list[str]]:
    """backend -> models that need it, from the repository's config.pbtxt files (backend or platform)."""
    out: dict[str, list[str]] = {}
    for f in sorted(Path(repo).glob("*/config.pbtxt")):
        cfg = text_format.Parse(f.read_text(), pb.ModelConfig())
        out.setdefault(cfg.backend or PLATFORMS.get(cfg.platform, cfg.platform), []).append(f.parent.name)
    return out


def server_backends() -> tuple[set[str], str]:
    """The backends the tritonserver that server_command would start has, and where they were looked up."""
    if shutil.which("tritonserver"):
        where = Path(os.environ.get("TRITON_BACKEND_DIRECTORY", "/opt/tritonserver/backends"))
    else:
        try:
            import pytriton
        except ImportError:
            return set(), "no tritonserver on PATH and no nvidia-pytriton wheel"
        where = Path(pytriton.__file__).parent / "tritonserver" / "backends"
    return ({p.name for p in where.iterdir() if p.is_dir()} if where.is_dir() else set()), str(where)


def check_repo(repo: Path, available: set[str] | None = None, where: str = "", required=None) -> None:
    """The repository is complete (every required model with its config and model file) and the server has every
    backend it names; otherwise a message that names what is missing and the fix."""
    missing = []
    for m in REQUIRED_MODELS if required is None else required:
        cfg_file = repo / m / "config.pbtxt"
        if not cfg_file.exists():
            missing.append(m)
            continue
        cfg = text_format.Parse(cfg_file.read_text(), pb.ModelConfig())
        model_file = cfg.default_model_filename or ("model.py" if cfg.backend == "python" else "model.onnx")
        if not (repo / m / "1" / model_file).exists():
            missing.append(f"{m}/1/{model_file}")
    if not repo.is_dir() or missing:
        raise StoryMakerError(f"{repo}: incomplete Triton repository (missing {missing or 'the folder'}). "
                              "Write it with `python -m export.build ... --out BUILD` (it creates BUILD/triton_repo).")
    if available is None:
        return
    lacking = {b: ms for b, ms in repo_backends(repo).items() if b not in available}
    if lacking:
        need = "; ".join(f"'{b}' (for {', '.join(ms)})" for b, ms in lacking.items())
        raise StoryMakerError(f"{repo}: this tritonserver ({where}) has no backend {need}; it has "
                              f"{sorted(available) or 'none'}. Serve BUILD/triton_repo (every model on the Python "
                              "backend) with this server, or this repository in the NGC tritonserver container "
                              "(`python -m runtime.serve --ngc-command BUILD` prints the command).")


def _wheel_server(work: Path) -> tuple[list[str], dict]:
    try:
        import pytriton
    except ImportError:
        raise StoryMakerError("no tritonserver on PATH and the nvidia-pytriton wheel is not installed") from None
    base = Path(pytriton.__file__).parent / "tritonserver"
    backends = work / "backends"
    if not (backends / "python" / "triton_python_backend_stub").exists():
        shutil.copytree(base / "backends", backends, dirs_exist_ok=True)
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(base / "python_backend_stubs" / ver / "triton_python_backend_stub", backends / "python")
    libs = [str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    env = {"LD_LIBRARY_PATH": ":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")])}
    return [str(base / "bin" / "tritonserver"), f"--backend-directory={backends}"], env


def server_command(repo: Path, grpc_port: int, http_port: int, metrics_port: int, address: str, admin_key: str,
                   work: Path, metrics_address: str | None = None) -> tuple[list[str], dict]:
    system = shutil.which("tritonserver")
    cmd, env = ([system], {}) if system else _wheel_server(work)
    cmd += [f"--model-repository={repo}", "--model-control-mode=none", "--strict-readiness=true",
            f"--grpc-address={address}", f"--grpc-port={grpc_port}", f"--http-address={address}",
            f"--http-port={http_port}", f"--metrics-address={metrics_address or address}",
            f"--metrics-port={metrics_port}",
            f"--grpc-restricted-protocol={ADMIN_PROTOCOLS}:admin-key={admin_key}",
            f"--http-restricted-api={ADMIN_PROTOCOLS}:admin-key={admin_key}", "--exit-timeout-secs=10",
            "--log-verbose=0"]
    return cmd, env


class TritonServer:
    """tritonserver for `repo`, behind the size-limiting gateway (runtime/serving/gateway.py) unless gateway=False:
    clients use `url` / `http_port` (the gateway's ports on `address`); tritonserver itself listens on loopback
    ports that only the gateway uses. The metrics port is the server's own."""

    def __init__(self, repo: Path | str, grpc_port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None, address: str = "127.0.0.1", admin_key: str | None = None,
                 log_file: Path | None = None, gateway: bool = True, max_message_bytes: int | None = None,
                 required_models: list[str] | None = None):
        self.repo = Path(repo).resolve()
        check_repo(self.repo, *server_backends(), required=required_models)   # a subset: benchmarks.full_size_serve
        self.address = address
        given = {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port}
        reserve(*given.values())
        # ports this object drew itself (by attribute): drawn again where tritonserver finds one taken
        self._drawn = {n for n, p in given.items() if not p}
        for n, p in given.items():
            setattr(self, n, p or free_port(address))
        self.admin_key = admin_key or os.environ.get("STORYMAKER_ADMIN_KEY") or secrets.token_hex(16)
        self.work = Path(tempfile.mkdtemp(prefix="storymaker-triton-"))
        self.log_file = Path(log_file or self.work / "server.log")
        self.proc: subprocess.Popen | None = None
        self.gateway = None
        if gateway:
            self.upstream_grpc_port, self.upstream_http_port = free_port(), free_port()
            self._drawn |= {"upstream_grpc_port", "upstream_http_port"}
            self.max_message_bytes = max_message_bytes or repo_message_limit(self.repo)
            self._new_gateway()
        else:
            self.upstream_grpc_port, self.upstream_http_port = self.grpc_port, self.http_port
            self.max_message_bytes = None

    @property
    def url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def _new_gateway(self) -> None:
        self.gateway = Gateway(self.address, self.grpc_port, self.http_port, self.upstream_grpc_port,
                               self.upstream_http_port, self.max_message_bytes)

    def start(self, timeout: float = 300.0) -> TritonServer:
        """Start and wait until ready. A port the caller chose that is taken fails at once with a message naming
        its flag; one this object drew and tritonserver found taken (runtime/serving/ports.py) is drawn again, up
        to PORT_ATTEMPTS starts."""
        for name, flag in PORT_FLAGS.items():
            port = getattr(self, name)
            if name not in self._drawn and not is_free(port, self.address):
                raise StoryMakerError(taken_message(port, self.address, flag))
        for attempt in range(1, PORT_ATTEMPTS + 1):
            taken = self._start_once(timeout)
            if taken is None:
                return self
            names = [n for n in PORT_NAMES if getattr(self, n) == taken]
            mine = [n for n in names if n in self._drawn]
            if not mine:
                flag = next((PORT_FLAGS[n] for n in names if n in PORT_FLAGS), "a port")
                raise StoryMakerError(taken_message(taken, self.address, flag))
            if attempt == PORT_ATTEMPTS:
                raise StoryMakerError(f"tritonserver found the ports drawn for it taken {attempt} times (last: "
                                      f"{taken}); pass free ports with --grpc-port/--http-port/--metrics-port. "
                                      f"Log: {self.log_file}")
            fresh = free_port("127.0.0.1" if all(n.startswith("upstream") for n in mine) else self.address)
            for n in mine:
                setattr(self, n, fresh)
            if self.gateway:
                self._new_gateway()
            print(f"port {taken} was taken before tritonserver bound it; starting again on {fresh}", file=sys.stderr,
                  flush=True)
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> int | None:
        """One start: None when ready, the port tritonserver or the gateway found taken, or StoryMakerError."""
        internal = "127.0.0.1" if self.gateway else self.address
        cmd, env = server_command(self.repo, self.upstream_grpc_port, self.upstream_http_port, self.metrics_port,
                                  internal, self.admin_key, self.work, metrics_address=self.address)
        self._log = open(self.log_file, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", reaper.__name__, *cmd],
                                     env={**os.environ, **malloc.env(), **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if self.gateway:                             # after the fork (gRPC threads); readiness is polled through it
            try:
                self.gateway.start()
            except PortTaken as e:                   # a public port taken since it was drawn or checked
                self.stop()
                return e.port
        deadline = time.monotonic() + timeout
        if wait_until_ready(self.url, timeout, self.proc) and self._services_bound(deadline):
            return None
        exited = self.proc.poll() is not None
        self.stop()
        if exited:
            taken = taken_port(self.log_tail(400))
            if taken is not None:
                return taken
            raise StoryMakerError(f"tritonserver exited with code {self.proc.returncode}; log: {self.log_file}\n"
                                  + self.log_tail())
        raise StoryMakerError(f"tritonserver not ready after {timeout:.0f} s; log: {self.log_file}\n" + self.log_tail())

    def _services_bound(self, deadline: float) -> bool:
        """gRPC answers ready before tritonserver binds its HTTP and metrics ports (in that order) and exits if
        one is taken: ready means every one answers."""
        host = "127.0.0.1" if self.address in ("0.0.0.0", "::") else self.address
        http_host = "127.0.0.1" if self.gateway else host           # where tritonserver's own HTTP port listens
        urls = [f"http://{http_host}:{self.upstream_http_port}/v2/health/ready",
                f"http://{host}:{self.metrics_port}/metrics"]
        while urls and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(urls[0], timeout=2) as r:
                    r.read()
                urls.pop(0)
            except OSError:                         # not bound yet, or bound by someone else: tritonserver exits
                time.sleep(0.2)
        return not urls and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text().splitlines()[-n:])
        except OSError:
            return ""

    @property
    def server_pid(self) -> int | None:
        """tritonserver's process id (self.proc is the reaper that runs it), None before it starts or after."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return None
        return children[0].pid if children else None

    def stop(self) -> None:
        if self.gateway:
            self.gateway.stop()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)   # our own process group only
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.work / "backends", ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until_ready(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Poll a server's gRPC readiness until ready (True), the timeout, or `proc` exiting (False)."""
    client, deadline = grpcclient.InferenceServerClient(url), time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            if client.is_server_ready():
                return True
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    return False


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argument_parser("python -m runtime.serve", __doc__)
    ap.add_argument("--repo", type=Path, help="BUILD/triton_repo written by export.build")
    ap.add_argument("--ngc-command", type=Path, metavar="BUILD",
                    help="print the tritonserver command and requirements for BUILD/triton_repo_ngc in an NGC "
                         "container (TensorRT version, backend config) and exit")
    ap.add_argument("--container-tensorrt", metavar="VERSION", help="with --ngc-command: check the engines load on "
                                                                     "this TensorRT version (the container's)")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--address", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 exposes it)")
    ap.add_argument("--no-gateway", action="store_true",
                    help="serve tritonserver's own ports directly, without the size-limiting gateway (then a huge "
                         "request is copied into the server before it is refused; docs/robustness.md)")
    ap.add_argument("--max-message-bytes", type=int, help="gateway: largest request accepted (default: the models' "
                                                          "max_request_bytes + 2 prompts + 8 MiB)")
    ap.add_argument("--admin-key", help="value of the admin-key header for admin protocols (default: "
                                        "$STORYMAKER_ADMIN_KEY or a random key printed at start)")
    a = ap.parse_args(argv)
    configure_logging(a)
    if a.ngc_command:
        try:
            cmd, notes = ngc_command(a.ngc_command, container_tensorrt=a.container_tensorrt)
        except StoryMakerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(" ".join(cmd))
        for n in notes:
            print(f"# {n}")
        return 0
    if a.repo is None:
        ap.error("--repo is required (or --ngc-command BUILD)")
    malloc.tune_this_process()                           # the gateway's message buffers (runtime/serving/malloc.py)
    signal.signal(signal.SIGTERM, _raise_interrupt)      # before starting: a stop while starting stops the server
    srv = None
    try:
        srv = TritonServer(a.repo, a.grpc_port, a.http_port, a.metrics_port, a.address, a.admin_key,
                           gateway=not a.no_gateway, max_message_bytes=a.max_message_bytes)
        front = (f"gateway (requests up to {srv.max_message_bytes} bytes) -> tritonserver on loopback"
                 if srv.gateway else "tritonserver")
        print(f"starting {front}: {a.address} gRPC {a.grpc_port}, HTTP {a.http_port}, metrics {a.metrics_port}; "
              f"log: {srv.log_file}", flush=True)
        srv.start()
        print(f"ready: gRPC {srv.url}; restricted APIs need header triton-grpc-protocol-admin-key (gRPC) or "
              f"admin-key (HTTP) = {srv.admin_key}", flush=True)
        while srv.proc.poll() is None:
            time.sleep(1)
        print(f"tritonserver exited with code {srv.proc.returncode}", file=sys.stderr)
        return 1
    except StoryMakerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        if srv is not None:
            srv.stop()

if __name__ == "__main__":
    sys.exit(main())
