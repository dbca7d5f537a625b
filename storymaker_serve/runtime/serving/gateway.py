"""A size-limiting gateway in front of tritonserver: oversized requests never reach the server.

tritonserver 2.51 has no message-size limit on either protocol: a 480 MB request
is read, parsed and copied into the Python backend's shared memory before our
budgets can refuse it, and neither the server's heap nor /dev/shm gives that
memory back (docs/robustness.md, "Known limits of the bundled server"). `runtime.serve` therefore
binds tritonserver to loopback ports and serves the public gRPC and HTTP ports
from this gateway, which forwards every call byte for byte and refuses a request
larger than `max_message_bytes` before reading it:

- gRPC: a generic handler forwards each method of `inference.GRPCInferenceService`
  (unary and the `ModelStreamInfer` stream) as raw bytes with the caller's
  metadata; gRPC itself refuses a message over the limit from its length prefix
  (RESOURCE_EXHAUSTED, "Received message larger than max (N vs. M)"). A client
  that cancels or disconnects cancels the upstream call, so cancellation reaches
  the model as before.
- HTTP (http_front.py): each connection is parsed by h11 (malformed framing, such as a negative
  Content-Length, is answered 400); the body is counted as it arrives, chunked or
  not, and a body over the limit is answered 413 with a JSON error naming the limit
  and never forwarded; compressed bodies are refused (415); a JSON inference
  request no model could take (not JSON, no inputs, STEPS as a string) is
  answered 400 instead of the server's 500.

The limit is derived from the repository's own budgets (`max_request_bytes` plus
both prompts plus headroom for the small tensors of a request), so it moves with
the config. The metrics port is not proxied.

`python -m storymaker_serve.runtime.serving.gateway --repo REPO` runs the gateway alone, in front of a
tritonserver started elsewhere on loopback ports (the Kubernetes sidecar in `deploy/`). On SIGTERM it stops
taking new requests and lets the running ones finish (up to `--drain-s`), as tritonserver does.
"""
from __future__ import annotations

import logging
import signal
import socketserver
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb

from storymaker_serve.runtime.cli import argument_parser, configure_logging
from storymaker_serve.runtime.serving import rest_infer
from storymaker_serve.runtime.serving.contract import LIMITS
from storymaker_serve.runtime.serving.http_front import HttpFront
from storymaker_serve.runtime.serving.ports import PortTaken

log = logging.getLogger(__name__)
HEADROOM = 8 << 20            # latents, tokens, options: every non-image input of one request, with room to spare
STREAMING = {"ModelStreamInfer"}


def repo_message_limit(repo: Path) -> int:
    """The largest request any model of `repo` accepts under its budgets (config.pbtxt parameters)."""
    budget = dict(LIMITS)
    for cfg in Path(repo).glob("*/config.pbtxt"):
        params = text_format.Parse(cfg.read_text(), model_config_pb2.ModelConfig()).parameters
        for k in ("max_request_bytes", "max_prompt_bytes"):
            if k in params:
                budget[k] = max(budget[k], int(params[k].string_value))
    return budget["max_request_bytes"] + 2 * budget["max_prompt_bytes"] + HEADROOM


def _metadata(context) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata() if not k.startswith((":", "grpc-")) and k != "user-agent"]


class _Forward:
    """grpc.GenericRpcHandler: every method forwarded raw to the upstream channel."""

    def __init__(self, channel):
        self.channel = channel

    def service(self, details):
        method = details.method
        if method.rsplit("/", 1)[-1] in STREAMING:
            upstream = self.channel.stream_stream(method)

            def incoming(requests):
                """The client's messages; a client that cancels or disconnects ends them quietly (grpc would log the
                error raised by the server-side iterator with a traceback for every cancelled stream)."""
                try:
                    yield from requests
                except grpc.RpcError:
                    return

            def stream(requests, context):
                call = upstream(incoming(requests), metadata=_metadata(context))
                context.add_callback(call.cancel)          # client gone or cancelled -> the server's request too
                try:
                    yield from call
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.CANCELLED or context.is_active():
                        context.abort(e.code(), e.details())

            return grpc.stream_stream_rpc_method_handler(stream)
        upstream = self.channel.unary_unary(method)

        def unary(request, context):
            call = upstream.future(request, metadata=_metadata(context))
            context.add_callback(call.cancel)
            try:
                return call.result()
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())
            except grpc.FutureCancelledError:
                context.abort(grpc.StatusCode.CANCELLED, "cancelled")

        return grpc.unary_unary_rpc_method_handler(unary)


class _ThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Gateway:
    """gRPC and HTTP listeners on the public ports, forwarding to tritonserver on loopback."""

    def __init__(self, address: str, grpc_port: int, http_port: int, upstream_grpc: int, upstream_http: int,
                 max_message_bytes: int, workers: int = 64):
        self.address, self.grpc_port, self.http_port = address, grpc_port, http_port
        self.upstream_grpc, self.upstream_http = upstream_grpc, upstream_http
        self.limit, self.workers = max_message_bytes, workers
        self._grpc = self._http = self._channel = None

    def start(self) -> Gateway:
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.upstream_grpc}", options=unlimited)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers),
                                 handlers=[_Forward(self._channel)],
                                 options=[("grpc.max_receive_message_length", self.limit),
                                          ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        if self._grpc.add_insecure_port(f"{self.address}:{self.grpc_port}") == 0:
            raise PortTaken(self.grpc_port, f"gateway: cannot bind gRPC {self.address}:{self.grpc_port} (port in use?)")
        self._grpc.start()
        infer_call = self._channel.unary_unary(rest_infer.METHOD,
                                               request_serializer=pb.ModelInferRequest.SerializeToString,
                                               response_deserializer=pb.ModelInferResponse.FromString)
        self._active = threading.Condition()
        self._active.count = 0                      # HTTP connections being served
        handler = type("Handler", (HttpFront,), {"upstream": ("127.0.0.1", self.upstream_http), "limit": self.limit,
                                                  "infer_call": infer_call, "active": self._active})
        try:
            self._http = _ThreadingServer((self.address, self.http_port), handler)
        except OSError as e:
            raise PortTaken(self.http_port, f"gateway: cannot bind HTTP {self.address}:{self.http_port}: {e}") from e
        threading.Thread(target=self._http.serve_forever, name="gateway-http", daemon=True).start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop taking requests; those running get up to `grace` seconds to finish (then gRPC cancels them and
        HTTP connections are dropped)."""
        deadline = time.monotonic() + grace
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        grpc_done = self._grpc.stop(grace=grace) if self._grpc is not None else None
        if self._http is not None:
            with self._active:
                self._active.wait_for(lambda: self._active.count == 0, timeout=max(0.0, deadline - time.monotonic()))
        if grpc_done is not None:
            grpc_done.wait()
        if self._channel is not None:
            self._channel.close()
        self._grpc = self._http = self._channel = None


def main(argv=None) -> int:
    ap = argument_parser("python -m storymaker_serve.runtime.serving.gateway", __doc__)
    ap.add_argument("--repo", type=Path, required=True,
                    help="the Triton repository tritonserver serves: the request limit is read from its configs")
    ap.add_argument("--address", default="127.0.0.1", help="public bind address (0.0.0.0 in a pod)")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--upstream-grpc-port", type=int, default=9001, help="tritonserver's gRPC port on 127.0.0.1")
    ap.add_argument("--upstream-http-port", type=int, default=9000, help="tritonserver's HTTP port on 127.0.0.1")
    ap.add_argument("--max-message-bytes", type=int, help="request limit (default: from the repository's budgets)")
    ap.add_argument("--drain-s", type=float, default=50.0, help="on SIGTERM, how long running requests may finish")
    a = ap.parse_args(argv)
    configure_logging(a)
    if not (a.repo / "storymaker" / "config.pbtxt").is_file() and a.max_message_bytes is None:
        ap.error(f"--repo {a.repo}: no storymaker/config.pbtxt there; pass the repository tritonserver serves "
                 "(BUILD/triton_repo or BUILD/triton_repo_ngc) or --max-message-bytes")
    limit = a.max_message_bytes or repo_message_limit(a.repo)
    try:
        gateway = Gateway(a.address, a.grpc_port, a.http_port, a.upstream_grpc_port, a.upstream_http_port,
                          limit).start()
    except PortTaken as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"gateway: gRPC {a.address}:{a.grpc_port}, HTTP {a.address}:{a.http_port} -> tritonserver on 127.0.0.1:"
          f"{a.upstream_grpc_port}/{a.upstream_http_port}; requests up to {limit} bytes", flush=True)
    stop.wait()
    print(f"gateway: stopping (running requests get up to {a.drain_s:g} s)", flush=True)
    gateway.stop(grace=a.drain_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
