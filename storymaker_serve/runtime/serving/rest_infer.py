"""A KServe v2 REST inference, carried as the equivalent gRPC `ModelInfer` call, and its answer back as REST.

tritonserver's HTTP frontend does not cancel an inference when its client disconnects (request cancellation
reaches a model from gRPC only), so an abandoned HTTP request would run its denoising loop to the last step. The
gateway's HTTP front therefore sends each REST inference to tritonserver over gRPC and cancels that call when the
client's connection closes; the model sees the cancellation at its next step, as for a gRPC client.

The translation follows the KServe v2 protocol with Triton's binary-data extension, both ways:

- request: the JSON header (the whole body, or its first `Inference-Header-Content-Length` bytes) gives `id`,
  `parameters`, `inputs` (`name`, `datatype`, `shape`, and `data` or a `binary_data_size` slice of what follows
  the header) and `outputs`; every input travels as raw bytes (BYTES as 4-byte little-endian lengths and the
  bytes, as Triton serialises them). Shared-memory inputs and outputs are refused: they name regions on the
  server's host, which a client of the public port does not share.
- response: each output as JSON `data` (row-major, flat), or as binary data after the JSON header when the
  request asked for it (the output's `binary_data` parameter, else the request's `binary_data_output`).
- errors: the gRPC status as its HTTP counterpart (INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503, ...),
  the message as `{"error": ...}`, as tritonserver's own HTTP frontend answers.
"""
from __future__ import annotations

import json
import struct

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
HTTP_ONLY = {"binary_data_size", "binary_data", "binary_data_output"}
SHM = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
          grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
          grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
          grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
          grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403}


class RestError(ValueError):
    """A REST inference request that cannot be carried as a gRPC one: answered 400 with this message."""


def _parameters(params: dict | None, into) -> None:
    for key, value in (params or {}).items():
        if key in HTTP_ONLY:
            continue
        if key in SHM:
            raise RestError(f"parameter {key}: shared memory is not served through the public port (it names "
                            "regions on the server's host); send the tensor in the request")
        if isinstance(value, bool):
            into[key].bool_param = value
        elif isinstance(value, int):
            into[key].int64_param = value
        elif isinstance(value, float):
            into[key].double_param = value
        elif isinstance(value, str):
            into[key].string_param = value
        else:
            raise RestError(f"parameter {key}: {value!r} is not a bool, number or string")


def _flat(data) -> list:
    out, stack = [], [data]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            out.append(x)
    return out


def _raw_from_json(name: str, dtype: str, shape: list[int], data) -> bytes:
    """The raw bytes of a tensor given as JSON `data` (row-major, nested or flat)."""
    flat = _flat(data)
    count = int(np.prod(shape)) if shape else 1
    if len(flat) != count:
        raise RestError(f"input {name}: {len(flat)} values for shape {shape} ({count} expected)")
    if dtype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise RestError(f"input {name}: BYTES data must be strings")
        encoded = [x.encode() for x in flat]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    try:
        if dtype == "BF16":                      # round to nearest even, from float32
            u = np.asarray(flat, np.float32).view(np.uint32).astype(np.uint64)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
        np_dtype = DTYPES[dtype]
        if np.issubdtype(np_dtype, np.integer):
            limits = np.iinfo(np_dtype)
            bad = next((x for x in flat if not isinstance(x, int) or not limits.min <= x <= limits.max), None)
            if bad is not None:
                raise RestError(f"input {name}: {bad!r} is not a {dtype} value ({limits.min}..{limits.max})")
        return np.asarray(flat, np_dtype).tobytes()
    except KeyError:
        raise RestError(f"input {name}: unknown datatype {dtype!r}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise RestError(f"input {name}: {dtype} data does not convert ({e})") from None


def _json_from_raw(dtype: str, raw: bytes) -> list:
    """A tensor's raw bytes as the flat JSON `data` list."""
    if dtype == "BYTES":
        out, i = [], 0
        while i + 4 <= len(raw):
            (n,) = struct.unpack_from("<I", raw, i)
            out.append(raw[i + 4:i + 4 + n].decode("utf-8", errors="replace"))
            i += 4 + n
        return out
    if dtype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).tolist()
    return np.frombuffer(raw, DTYPES[dtype]).tolist()


def grpc_request(model: str, version: str, body: bytes, header_length: int | None):
    """A REST inference body as a `ModelInferRequest`, and `as_binary(output name)`: whether the client wants
    that output as binary data. Raises RestError for what cannot be carried."""
    head = body[:header_length] if header_length is not None else body
    try:
        doc = json.loads(head)
    except ValueError as e:
        raise RestError(f"the request body is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RestError("the body must be a JSON object")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=str(doc.get("id", "")))
    _parameters(doc.get("parameters"), request.parameters)
    blob = body[header_length:] if header_length is not None else b""
    offset = 0
    for inp in doc.get("inputs") or []:
        name, dtype, shape = inp.get("name", ""), str(inp.get("datatype", "")), inp.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RestError(f"input {name}: shape {shape!r} must be a list of non-negative integers")
        tensor = request.inputs.add(name=name, datatype=dtype, shape=shape)
        params = inp.get("parameters") or {}
        _parameters(params, tensor.parameters)
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool):
                raise RestError(f"input {name}: binary_data_size {size!r} is not an integer")
            if size < 0 or offset + size > len(blob):
                raise RestError(f"input {name}: binary_data_size {size} runs past the {len(blob)} bytes of "
                                "binary data after the JSON header")
            request.raw_input_contents.append(blob[offset:offset + size])
            offset += size
        elif "data" in inp:
            request.raw_input_contents.append(_raw_from_json(name, dtype, shape, inp["data"]))
        else:
            raise RestError(f"input {name}: neither `data` nor a `binary_data_size` parameter")
    if offset != len(blob):
        raise RestError(f"{len(blob) - offset} bytes of binary data after the JSON header belong to no input")
    default = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    binary = {}
    for out in doc.get("outputs") or []:
        params = out.get("parameters") or {}
        tensor = request.outputs.add(name=out.get("name", ""))
        _parameters(params, tensor.parameters)
        binary[tensor.name] = bool(params.get("binary_data", default))
    return request, lambda name: binary.get(name, default)


def _parameter_value(p):
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def rest_response(response, as_binary) -> tuple[bytes, list[tuple[str, str]]]:
    """A `ModelInferResponse` as a REST body and its headers (binary outputs after the JSON header, whose length
    `Inference-Header-Content-Length` gives)."""
    doc = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = {k: _parameter_value(v) for k, v in response.parameters.items()}
    outputs, blobs = [], []
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if as_binary(out.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_from_raw(out.datatype, raw)
        outputs.append(entry)
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, [("content-type", "application/json")]
    return head + b"".join(blobs), [("content-type", "application/octet-stream"),
                                    ("inference-header-content-length", str(len(head)))]


def http_status(code) -> int:
    return STATUS.get(code, 500)
