"""The served deployment's front: the h11 HTTP gateway refuses what tritonserver would keep in memory or answer
with a 500, and every error carries its documented code, on the stream too."""
import json

import pytest
from helpers import MAN, tree_rss_mb


def test_stream_errors_carry_their_code(server, client):
    """Triton's stream responses carry a message, no status: the client reads the code from the documented prefix,
    so a client mistake is INVALID_ARGUMENT on the stream as on a single request."""
    from storymaker_serve.runtime.serving.client import ServerError

    tokens = client.encode_characters([MAN])
    for call in (lambda: client.generate("a man", tokens=tokens, width=64, height=64, steps=2, seed=2**40),
                 lambda: list(client.generate_stream("a man", tokens=tokens, width=64, height=64, steps=2,
                                                     seed=2**40))):
        with pytest.raises(ServerError) as e:
            call()
        assert e.value.code == "INVALID_ARGUMENT" and e.value.message.startswith("invalid input: seed="), e.value


def test_http_front_refuses_what_tritonserver_would_not_survive_or_answer_500(server):
    """The gateway's h11 front: a gzip body (a 300 kB bomb inflates to 300 MiB inside tritonserver) is refused
    with 415, a negative Content-Length with 400, an oversized one with 413, a body that is not JSON, one without
    inputs, STEPS as a string and a POST without Content-Length (no body, as HTTP/1.1 reads it) with
    400, all before tritonserver sees them; its memory stays."""
    import gzip
    import socket

    def send(raw: bytes) -> tuple[int, str]:
        with socket.create_connection((server.address, server.http_port), timeout=30) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and len(data.split(b"\r\n\r\n", 1)[1]) >= int(
                        next((ln.split(b":")[1] for ln in data.split(b"\r\n") if ln.lower().startswith(
                            b"content-length")), b"0")):
                    break
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")

    def post(body: bytes, extra: str = "") -> bytes:
        return (f"POST /v2/models/storymaker/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    rss0 = tree_rss_mb(server.proc.pid)
    bomb = gzip.compress(b'{"inputs": [{"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["'
                         + b"a" * (300 << 20) + b'"]}]}', compresslevel=9)
    status, text = send(post(bomb, "Content-Encoding: gzip\r\n"))
    assert status == 415 and "Content-Encoding gzip is not accepted" in text
    status, _ = send(b"POST /v2/models/storymaker/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert status == 400
    status, text = send(b"POST /v2/models/storymaker/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                        + str(server.max_message_bytes + 1).encode() + b"\r\nConnection: close\r\n\r\n")
    assert status == 413 and str(server.max_message_bytes) in text
    for body, why in ((b"not json", "not JSON"), (b'{"outputs": []}', "non-empty `inputs` list"),
                      (json.dumps({"inputs": [{"name": "STEPS", "datatype": "INT32", "shape": [1],
                                               "data": ["many"]}]}).encode(), "input STEPS: INT32 data holds 'many'")):
        status, text = send(post(body))
        assert status == 400 and why in text and "invalid input:" in text, (status, text)
    status, text = send(b"POST /v2/models/storymaker/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                        + b"x" * 4096)                       # no Content-Length: a request without a body
    assert status == 400 and "not JSON" in text, (status, text)
    assert tree_rss_mb(server.proc.pid) - rss0 < 150
    ok = {"inputs": [{"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": ["a man"]}],
          "outputs": [{"name": "TRUNCATED"}]}
    status, text = send(post(json.dumps(ok).encode()).replace(b"storymaker/infer", b"text_encoder/infer"))
    assert status == 200, text                                # a valid request still goes through


# ---- REST inference carried as gRPC (runtime/serving/rest_infer.py) ----

def test_rest_request_becomes_the_grpc_request_tritonclient_would_send():
    """JSON data, binary data after the header and BYTES all arrive as the raw bytes tritonclient's gRPC client
    sends for the same tensors; per-output binary choices follow the output's flag, else the request's."""
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import serialize_byte_tensor

    from storymaker_serve.runtime.serving.rest_infer import grpc_request

    latents = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    inputs = [httpclient.InferInput("LATENTS", [1, 2, 3, 4], "FP32"), httpclient.InferInput("PROMPT", [2], "BYTES"),
              httpclient.InferInput("STEPS", [1], "INT32"), httpclient.InferInput("FLAG", [1], "BOOL")]
    inputs[0].set_data_from_numpy(latents, binary_data=True)
    inputs[1].set_data_from_numpy(np.array(["a man", "naïve"], dtype=object), binary_data=False)
    inputs[2].set_data_from_numpy(np.array([7], np.int32), binary_data=False)
    inputs[3].set_data_from_numpy(np.array([True]), binary_data=True)
    outputs = [httpclient.InferRequestedOutput("IMAGE", binary_data=True),
               httpclient.InferRequestedOutput("TRUNCATED", binary_data=False)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id="r1")
    request, as_binary = grpc_request("storymaker", "", body, json_size)
    assert request.model_name == "storymaker" and request.id == "r1"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("LATENTS", "FP32", [1, 2, 3, 4]), ("PROMPT", "BYTES", [2]), ("STEPS", "INT32", [1]), ("FLAG", "BOOL", [1])]
    raw = request.raw_input_contents
    assert raw[0] == latents.tobytes() and raw[2] == np.int32(7).tobytes() and raw[3] == b"\x01"
    assert raw[1] == serialize_byte_tensor(np.array(["a man", "naïve"], dtype=object)).item()
    assert [o.name for o in request.outputs] == ["IMAGE", "TRUNCATED"]
    assert as_binary("IMAGE") and not as_binary("TRUNCATED") and not as_binary("OTHER")
    nested = json.dumps({"inputs": [{"name": "X", "datatype": "FP16", "shape": [2, 2], "data": [[1, 2], [3, 4]]}],
                         "parameters": {"binary_data_output": True, "priority": 2}}).encode()
    request, as_binary = grpc_request("m", "3", nested, None)
    assert request.raw_input_contents[0] == np.array([1, 2, 3, 4], np.float16).tobytes() and as_binary("ANY")
    assert request.model_version == "3" and request.parameters["priority"].int64_param == 2


@pytest.mark.parametrize("doc,why", [
    ({"inputs": [{"name": "X", "datatype": "INT32", "shape": [3], "data": [1, 2]}]}, r"2 values for shape \[3\]"),
    ({"inputs": [{"name": "X", "datatype": "INT32", "shape": [-1], "data": [1]}]}, "non-negative integers"),
    ({"inputs": [{"name": "X", "datatype": "INT32", "shape": [1]}]}, "neither `data` nor"),
    ({"inputs": [{"name": "X", "datatype": "INT32", "shape": [1], "parameters": {"binary_data_size": 8}}]},
     "runs past the 0 bytes"),
    ({"inputs": [{"name": "X", "datatype": "INT32", "shape": [1], "data": [1],
                  "parameters": {"shared_memory_region": "r"}}]}, "shared memory is not served"),
    ({"inputs": [{"name": "X", "datatype": "BYTES", "shape": [1], "data": [3]}]}, "BYTES data must be strings"),
    ({"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1], "data": [300]}]},
     r"300 is not a UINT8 value \(0..255\)"),
])
def test_rest_requests_that_cannot_be_carried_name_the_input(doc, why):
    from storymaker_serve.runtime.serving.rest_infer import RestError, grpc_request

    with pytest.raises(RestError, match=why):
        grpc_request("m", "", json.dumps(doc).encode(), None)


def test_grpc_response_becomes_the_rest_response_tritonclient_reads():
    """The REST answer tritonclient's HTTP client parses back into the same arrays, binary or JSON."""
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.utils import serialize_byte_tensor

    from storymaker_serve.runtime.serving.rest_infer import rest_response

    image = np.random.default_rng(0).integers(0, 255, (1, 4, 5, 3), dtype=np.uint8)
    info = np.array([b'{"seed": 3}'], dtype=object)
    response = pb.ModelInferResponse(model_name="storymaker", model_version="1", id="r1")
    response.outputs.add(name="IMAGE", datatype="UINT8", shape=[1, 4, 5, 3])
    response.outputs.add(name="INFO", datatype="BYTES", shape=[1])
    response.outputs.add(name="TRUNCATED", datatype="BOOL", shape=[1])
    response.raw_output_contents.extend([image.tobytes(), serialize_byte_tensor(info).item(), b"\x00"])
    body, headers = rest_response(response, lambda name: name == "IMAGE")
    header = dict(headers).get("inference-header-content-length")
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=int(header))
    assert np.array_equal(result.as_numpy("IMAGE"), image)
    assert result.as_numpy("INFO")[0] == info[0].decode()                  # BYTES as JSON data: strings
    assert result.as_numpy("TRUNCATED").tolist() == [False] and result.get_response()["id"] == "r1"
    body, headers = rest_response(response, lambda name: False)
    assert dict(headers)["content-type"] == "application/json"
    assert json.loads(body)["outputs"][0]["data"] == image.ravel().tolist()


def test_rest_inference_is_cancelled_when_its_client_disconnects(server, client):
    """A REST inference goes to tritonserver as a gRPC call that the front cancels when the HTTP client closes
    its connection: the UNet stops within a step, as for a cancelled gRPC request."""
    import socket
    import time

    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    admin = grpcclient.InferenceServerClient(server.url)
    unet_count = lambda: int(admin.get_inference_statistics("unet", as_json=True)["model_stats"][0]["inference_count"])
    pos, neg = client.encode_characters([MAN])
    named = {"PROMPT": np.array(["a man"], dtype=object), "STEPS": np.array([200], np.int32),
             "WIDTH": np.array([64], np.int32), "HEIGHT": np.array([64], np.int32),
             "IMAGE_TOKENS": pos, "NEG_IMAGE_TOKENS": neg}
    inputs = []
    for name, value in named.items():
        dtype = "BYTES" if value.dtype == object else {"int32": "INT32", "float32": "FP32"}[str(value.dtype)]
        inputs.append(httpclient.InferInput(name, list(value.shape), dtype))
        inputs[-1].set_data_from_numpy(value, binary_data=dtype != "BYTES")
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs)
    head = (f"POST /v2/models/storymaker/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            + (f"Inference-Header-Content-Length: {json_size}\r\n" if json_size else "") + "\r\n").encode()
    t0 = unet_count()
    with socket.create_connection((server.address, server.http_port), timeout=30) as s:
        s.sendall(head + body)
        deadline = time.time() + 60
        while unet_count() < t0 + 6 and time.time() < deadline:    # a few denoising steps have run
            time.sleep(0.05)
        assert unet_count() >= t0 + 6, "the REST inference did not start"
    time.sleep(1.0)                                                  # the front polls every 0.1 s
    after_close = unet_count()
    time.sleep(2.0)
    assert unet_count() - after_close <= 2 * 2 and unet_count() - t0 < 2 * 200 // 2
