"""The gateway's HTTP front: each client connection parsed by h11, bodies counted and bounded, compressed bodies
refused, JSON inference requests checked before they reach tritonserver and carried to it as gRPC calls (rest_infer)
so that a client that disconnects cancels its request. `Gateway` (gateway.py) serves it on the public HTTP port."""
from __future__ import annotations

import http.client
import json
import re
import select
import socket
import socketserver
import urllib.parse
from concurrent import futures

import grpc
import h11

from storymaker_serve.runtime.serving import rest_infer

CHUNK = 1 << 20
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
               "content-length"}

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


class HttpFront(socketserver.BaseRequestHandler):
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
                if closed(sock):
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


def closed(sock) -> bool:
    """Whether the client closed its connection (readable with nothing to read). Bytes waiting there (a pipelined
    next request) are left for h11."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
