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
- HTTP: the body size comes from Content-Length (chunked bodies are refused: 411);
  a body over the limit is drained in 1 MB pieces without being kept, answered
  413 with a JSON error naming the limit, and never forwarded.

The limit is derived from the repository's own budgets (`max_request_bytes` plus
both prompts plus headroom for the small tensors of a request), so it moves with
the config. The metrics port is not proxied.
"""
from __future__ import annotations

import http.client
import json
import logging
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from storymaker_serve.runtime.serving.contract import LIMITS
from storymaker_serve.runtime.serving.ports import PortTaken

log = logging.getLogger(__name__)
HEADROOM = 8 << 20            # latents, tokens, options: every non-image input of one request, with room to spare
CHUNK = 1 << 20
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
               "content-length"}
STREAMING = {"ModelStreamInfer"}


def repo_message_limit(repo: Path) -> int:
    """The largest request any model of `repo` accepts under its budgets (config.pbtxt parameters)."""
    budget = dict(LIMITS)
    for cfg in Path(repo).glob("*/config.pbtxt"):
        params = text_format.Parse(cfg.read_text(), pb.ModelConfig()).parameters
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


class _HttpForward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int] = ("127.0.0.1", 8000)
    limit: int = 0

    def log_message(self, fmt, *args):          # access log at debug level, not on stderr
        log.debug("%s - %s", self.address_string(), fmt % args)

    def _answer(self, status: int, body: bytes, headers=(("Content-Type", "application/json"),)) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: int, msg: str) -> None:
        self._answer(status, json.dumps({"error": msg}).encode())

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return self._refuse(411, "chunked request bodies are not accepted; send Content-Length")
        size = int(self.headers.get("Content-Length") or 0)
        if size > self.limit:
            left = size
            while left > 0:                          # drain without keeping it: the client gets its answer
                got = self.rfile.read(min(CHUNK, left))
                if not got:
                    break
                left -= len(got)
            return self._refuse(413, f"request body of {size} bytes is over this server's limit of {self.limit} "
                                     "bytes (max_request_bytes of the models plus prompts); send smaller images")
        body = self.rfile.read(size) if size else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        conn = http.client.HTTPConnection(*self.upstream, timeout=3600)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            keep = [(k, v) for k, v in r.getheaders() if k.lower() not in HOP_HEADERS]
            self._answer(r.status, data, keep)
        except OSError as e:
            self._refuse(502, f"tritonserver did not answer: {e}")
        finally:
            conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward


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
        handler = type("Handler", (_HttpForward,), {"upstream": ("127.0.0.1", self.upstream_http), "limit": self.limit})
        try:
            self._http = ThreadingHTTPServer((self.address, self.http_port), handler)
        except OSError as e:
            raise PortTaken(self.http_port, f"gateway: cannot bind HTTP {self.address}:{self.http_port}: {e}") from e
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="gateway-http", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._channel is not None:
            self._channel.close()
        self._grpc = self._http = self._channel = None
