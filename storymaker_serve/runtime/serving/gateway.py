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
- HTTP: each connection is parsed by h11 (malformed framing, such as a negative
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

import http.client
import json
import logging
import re
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from concurrent import futures
from pathlib import Path

import grpc
import h11
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb

from storymaker_serve.runtime.cli import argument_parser, configure_logging
from storymaker_serve.runtime.serving import rest_infer
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


INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(/versions/(?P<version>[^/]+))?/infer$")
NUMERIC = ("INT", "UINT", "FP", "BF")
MAX_HEAD = 64 << 10                   # request line and headers
IDLE_S = 120.0
DRAIN_IDLE_S = 2.0                    # a refused body is read and dropped while it keeps arriving
DISCONNECT_POLL_S = 0.1               # how often a running REST inference checks that its client is still there


def check_infer_json(doc) -> str | None:
    """Why a KServe v2 JSON inference request cannot be what a model takes, or None: what tritonserver's HTTP
    frontend would otherwise answer with a 500 (a body that is not an object, no `inputs`, data of the wrong
    type, such as STEPS as a string)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        return "the body must be a JSON object with a non-empty `inputs` list"
    for inp in doc["inputs"]:
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            return "every input needs a `name`"
        dtype, data = str(inp.get("datatype", "")), inp.get("data")
        if data is None:
            continue                                      # binary tensor data: checked by the server
        flat, stack = [], [data]
        while stack:
            x = stack.pop()
            if isinstance(x, list):
                stack.extend(x)
            else:
                flat.append(x)
        if dtype.startswith(NUMERIC):
            bad = [x for x in flat if isinstance(x, bool) or not isinstance(x, (int, float))]
        elif dtype == "BOOL":
            bad = [x for x in flat if not isinstance(x, bool)]
        elif dtype == "BYTES":
            bad = [x for x in flat if not isinstance(x, str)]
        else:
            return f"input {inp['name']}: unknown datatype {dtype!r}"
        if bad:
            return f"input {inp['name']}: {dtype} data holds {bad[0]!r}"
    return None


def _raw_response(status: int, message: str) -> bytes:
    """A complete error response (Connection: close), for when the request could not even be parsed."""
    body = json.dumps({"error": message}).encode()
    reason = http.client.responses.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class _HttpFront(socketserver.BaseRequestHandler):
    """One client connection, parsed by h11 (a maintained HTTP/1.1 implementation: malformed framing such as a
    negative Content-Length is a protocol error, answered 400). Bodies are counted as they arrive (chunked ones
    too) and refused at the limit; compressed bodies are refused (a 300 kB gzip body can inflate to 300 MiB inside
    tritonserver, which keeps that memory); a JSON inference request that no model could take is answered 400 here
    instead of 500 by the server."""

    upstream: tuple[str, int] = ("127.0.0.1", 8000)
    limit: int = 0

    def handle(self) -> None:
        with self.active:
            self.active.count += 1
        try:
            self._handle()
        finally:
            with self.active:
                self.active.count -= 1
                self.active.notify_all()

    def _handle(self) -> None:
        sock = self.request
        sock.settimeout(IDLE_S)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while self._one(conn, sock):
                conn.start_next_cycle()
        except (OSError, h11.LocalProtocolError):
            pass

    def _event(self, conn, sock):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(sock.recv(CHUNK))

    def _send(self, conn, sock, status: int, body: bytes, headers=(("content-type", "application/json"),)) -> None:
        head = [*headers, ("content-length", str(len(body)))]
        sock.sendall(conn.send(h11.Response(status_code=status, headers=head)))
        sock.sendall(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))

    def _refuse(self, conn, sock, status: int, message: str, drain: int = 0) -> bool:
        """Answer an error at once and close the connection. Up to `drain` more bytes of the body are read and
        dropped first (while they keep coming), so a client that sends its whole body before reading sees the
        answer instead of a reset connection."""
        self._send(conn, sock, status, json.dumps({"error": message}).encode(), (("content-type", "application/json"),
                                                                                 ("connection", "close")))
        sock.settimeout(DRAIN_IDLE_S)
        try:
            while drain > 0 and (chunk := sock.recv(min(CHUNK, drain))):
                drain -= len(chunk)
        except OSError:
            pass
        return False

    def _one(self, conn, sock) -> bool:
        """Serve one request; True if the connection can carry another."""
        try:
            request = self._event(conn, sock)
            if isinstance(request, h11.ConnectionClosed):
                return False
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                return self._refuse(conn, sock, 415, f"Content-Encoding {encoding} is not accepted: send the body "
                                                     "uncompressed (its size is what the limit counts)")
            declared = int(headers.get("content-length") or 0)
            if declared > self.limit:                                      # refused from its announced size
                return self._refuse(conn, sock, 413, self._too_large(declared), drain=declared)
            body = bytearray()
            while not isinstance(event := self._event(conn, sock), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.limit:                             # chunked: counted as it arrives
                        return self._refuse(conn, sock, 413, self._too_large(len(body)), drain=self.limit)
        except h11.RemoteProtocolError as e:
            sock.sendall(_raw_response(e.error_status_hint, f"malformed HTTP request: {e}"))
            return False
        method, target = request.method.decode(), request.target.decode("latin-1")
        infer = INFER.match(target.split("?")[0]) if method == "POST" else None
        if infer:
            why = self._check_infer(headers, bytes(body))
            if why:
                self._send(conn, sock, 400, json.dumps({"error": f"invalid input: {why}"}).encode())
            elif not self._infer(conn, sock, infer["model"], infer["version"] or "", headers, bytes(body)):
                return False                                # the client went away: its request was cancelled
        else:
            self._forward(conn, sock, method, target, headers, bytes(body))
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _too_large(self, size: int) -> str:
        return (f"request body of {size} bytes is over this server's limit of {self.limit} bytes (max_request_bytes of "
                "the models plus prompts); send smaller images")

    @staticmethod
    def _check_infer(headers: dict, body: bytes) -> str | None:
        n = headers.get("inference-header-content-length")
        try:
            json_part = body[: int(n)] if n is not None else body
            return check_infer_json(json.loads(json_part))
        except ValueError as e:
            return f"the request body is not JSON ({e})"

    def _infer(self, conn, sock, model: str, version: str, headers: dict, body: bytes) -> bool:
        """A REST inference as the equivalent gRPC call (rest_infer), cancelled when the client's connection
        closes; False if it did."""
        try:
            n = headers.get("inference-header-content-length")
            request, as_binary = rest_infer.grpc_request(urllib.parse.unquote(model), urllib.parse.unquote(version),
                                                         body, int(n) if n is not None else None)
        except (rest_infer.RestError, ValueError) as e:
            self._send(conn, sock, 400, json.dumps({"error": f"invalid input: {e}"}).encode())
            return True
        call = self.infer_call.future(request, metadata=[(k, v) for k, v in headers.items() if k.startswith(
            "triton-")])
        while not call.done():
            try:
                call.result(timeout=DISCONNECT_POLL_S)
            except (futures.TimeoutError, grpc.FutureTimeoutError):
                if _closed(sock):
                    call.cancel()
                    return False
            except (grpc.RpcError, grpc.FutureCancelledError):
                break
        try:
            body, head = rest_infer.rest_response(call.result(), as_binary)
            self._send(conn, sock, 200, body, head)
        except grpc.RpcError as e:
            self._send(conn, sock, rest_infer.http_status(e.code()), json.dumps({"error": e.details()}).encode())
        except grpc.FutureCancelledError:
            return False
        return True

    def _forward(self, conn, sock, method: str, target: str, headers: dict, body: bytes) -> None:
        up = http.client.HTTPConnection(*self.upstream, timeout=3600)
        try:
            up.request(method, target, body=body or None,
                       headers={k: v for k, v in headers.items() if k not in HOP_HEADERS})
            r = up.getresponse()
            data = r.read()
            keep = [(k, v) for k, v in r.getheaders() if k.lower() not in HOP_HEADERS]
            self._send(conn, sock, r.status, data, keep)
        except OSError as e:
            self._send(conn, sock, 502, json.dumps({"error": f"tritonserver did not answer: {e}"}).encode())
        finally:
            up.close()


def _closed(sock) -> bool:
    """Whether the client closed its connection (readable with nothing to read). Bytes waiting there (a pipelined
    next request) are left for h11."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


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
        handler = type("Handler", (_HttpFront,), {"upstream": ("127.0.0.1", self.upstream_http), "limit": self.limit,
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
