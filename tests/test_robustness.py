"""Operator-facing robustness of the served deployment: hostile or oversized requests get a clear, correctly coded
error for that request only, are refused cheaply, and the server keeps serving."""
import io
import json
import os
import time

import numpy as np
import pytest
from helpers import DATA, tree_rss_mb
from PIL import Image

MAN = {"photo": DATA / "ldh.png", "mask": DATA / "ldh_mask.png", "face": DATA / "ldh.face.json"}
SMALL = dict(width=64, height=64, steps=2, seed=3)


def _raw(server, model: str, inputs: dict, outputs=("IMAGE",)):
    """One request with tritonclient directly (no client-side checks, large messages allowed); returns
    (status code name, message) or ("OK", result)."""
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    c = g.InferenceServerClient(server.url, channel_args=[("grpc.max_send_message_length", 512 << 20),
                                                          ("grpc.max_receive_message_length", 512 << 20)])
    ins = []
    for name, (arr, dtype) in inputs.items():
        i = g.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        ins.append(i)
    try:
        r = c.infer(model, ins, outputs=[g.InferRequestedOutput(o) for o in outputs])
        return "OK", r
    except InferenceServerException as e:
        return str(e.status()).replace("StatusCode.", ""), e.message()


def _bytes(*xs):
    return np.array(list(xs), dtype=object), "BYTES"


def test_huge_prompt_is_refused_fast_and_does_not_delay_others(server, client):
    import threading

    tokens = client.encode_characters([MAN])
    t0 = time.perf_counter()
    client.generate("a man", tokens=tokens, **SMALL)
    alone = time.perf_counter() - t0
    result = {}

    def huge():
        t = time.perf_counter()
        result["huge"] = _raw(server, "storymaker", {"PROMPT": _bytes(b"a " * (4 << 20))})
        result["huge_s"] = time.perf_counter() - t

    th = threading.Thread(target=huge)
    th.start()
    t0 = time.perf_counter()
    client.generate("a man", tokens=tokens, **SMALL)
    concurrent = time.perf_counter() - t0
    th.join(60)
    code, msg = result["huge"]
    assert code == "INVALID_ARGUMENT" and "PROMPT" in msg and "max_prompt_bytes" in msg
    assert result["huge_s"] < 1.0, result["huge_s"]
    assert concurrent - alone < 1.0, (alone, concurrent)


def test_request_budget_is_checked_before_anything_is_decoded(server):
    photo, mask = (DATA / "ldh.png").read_bytes(), (DATA / "ldh_mask.png").read_bytes()
    code, msg = _raw(server, "storymaker", {"PROMPT": _bytes(b"x"), "PHOTOS": _bytes(*[photo] * 8),
                                            "MASKS": _bytes(*[mask] * 8)})
    assert code == "INVALID_ARGUMENT" and "8 characters given" in msg
    big = b"\xff\xd8\xff" + bytes(22 << 20)       # 22 MB "JPEG", never decoded: 3 of them pass the gateway (72 MB)
    t = time.perf_counter()
    code, msg = _raw(server, "encode_characters", {"PHOTOS": _bytes(big, big, big), "MASKS": _bytes(mask, mask, mask)},
                     ("IMAGE_TOKENS",))
    assert code == "INVALID_ARGUMENT" and "max_request_bytes" in msg, msg
    assert time.perf_counter() - t < 10


def _shm_mb() -> float:
    return sum(f.stat().st_size for f in os.scandir("/dev/shm") if f.is_file()) / 2**20


def test_oversized_requests_never_reach_the_server_and_memory_stays(server, client):
    """Ten 480 MB requests (8 photos + 8 masks of 30 MB) over gRPC and one over HTTP are refused by the gateway
    from their size, before tritonserver reads them: its RSS (with the stubs) stays within 200 MB of the
    baseline and /dev/shm within 100 MB, and a valid request is served afterwards."""
    import urllib.error
    import urllib.request

    img, _ = client.generate("a man", characters=[{"photo": (DATA / "ldh.png").read_bytes(),
                                                  "mask": (DATA / "ldh_mask.png").read_bytes()}], **SMALL)
    rss0, shm0 = tree_rss_mb(server.proc.pid), _shm_mb()
    big = _bytes(*[b"\xff\xd8\xff" + bytes(30 << 20)] * 8)
    for _ in range(10):
        t = time.perf_counter()
        code, msg = _raw(server, "storymaker", {"PROMPT": _bytes(b"x"), "PHOTOS": big, "MASKS": big})
        assert code == "RESOURCE_EXHAUSTED" and f"vs. {server.max_message_bytes}" in msg, (code, msg)
        assert time.perf_counter() - t < 20
    body = b'{"inputs": []}' + b" " * (480 << 20)
    req = urllib.request.Request(f"http://{server.address}:{server.http_port}/v2/models/storymaker/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and str(server.max_message_bytes) in e.value.read().decode()
    del big, body
    rss1, shm1 = tree_rss_mb(server.proc.pid), _shm_mb()
    assert rss1 - rss0 < 200 and shm1 - shm0 < 100, (rss0, rss1, shm0, shm1)
    again, _ = client.generate("a man", characters=[{"photo": (DATA / "ldh.png").read_bytes(),
                                                    "mask": (DATA / "ldh_mask.png").read_bytes()}], **SMALL)
    assert np.array_equal(img, again)


@pytest.mark.slow
def test_gateway_limit_follows_the_repository_budgets(tmp_path, built):
    """The gateway's limit is the models' max_request_bytes + both prompts + headroom, read from config.pbtxt."""
    import shutil

    from storymaker_serve.runtime.serving.contract import LIMITS
    from storymaker_serve.runtime.serving.gateway import HEADROOM, repo_message_limit

    want = LIMITS["max_request_bytes"] + 2 * LIMITS["max_prompt_bytes"] + HEADROOM
    assert repo_message_limit(built / "triton_repo") == want
    repo = tmp_path / "repo"
    shutil.copytree(built / "triton_repo", repo, symlinks=True)
    cfg = repo / "storymaker" / "config.pbtxt"
    text = cfg.read_text()
    assert f'string_value: "{LIMITS["max_request_bytes"]}"' in text
    cfg.write_text(text.replace(f'string_value: "{LIMITS["max_request_bytes"]}"', 'string_value: "200000000"'))
    assert repo_message_limit(repo) == 200000000 + 2 * LIMITS["max_prompt_bytes"] + HEADROOM


@pytest.mark.parametrize("case,inputs,code,text", [
    ("keypoints as strings", {"FACE_INFO": '{"kps": [["a","b"]], "embedding": []}'}, "INVALID_ARGUMENT", "face info"),
    ("keypoints off the photo", {"FACE_INFO": json.dumps({"kps": [[9000, 10]] * 5, "embedding": [1.0] * 512})},
     "INVALID_ARGUMENT", "outside the 448x640 photo"),
    ("EPS photo", {"PHOTOS": b"%!PS-Adobe-3.0 EPSF-3.0\n"}, "INVALID_ARGUMENT",
     "EPS/PostScript images are not accepted"),
    ("seed beyond 32 bits", {"SEED": 2**40}, "INVALID_ARGUMENT", "seed=1099511627776 must be 0..4294967295"),
    ("a 6400x8 strip", {"PHOTOS": "strip"}, "INVALID_ARGUMENT", "6400x8 pixels; each side must be 16 to 8192"),
    ("a 6400x100 banner", {"PHOTOS": "banner"}, "INVALID_ARGUMENT", "6400x100 pixels has an aspect ratio over 8:1"),
    ("a 16777216x1 line", {"PHOTOS": "line"}, "INVALID_ARGUMENT", "each side must be 16 to 8192 pixels"),
    ("interpolation of one character", {"INTERPOLATION": 0.5}, "INVALID_ARGUMENT",
     "INTERPOLATION blends two characters; 1 given"),
    ("interpolation out of range", {"INTERPOLATION": 7.0}, "INVALID_ARGUMENT", "INTERPOLATION=7.0: give a weight"),
])
def test_client_mistakes_are_invalid_argument_and_name_the_input(server, client, case, inputs, code, text):
    photo, mask = (DATA / "ldh.png").read_bytes(), (DATA / "ldh_mask.png").read_bytes()
    shapes = {"strip": (6400, 8), "banner": (6400, 100), "line": (16777216, 1)}
    if inputs.get("PHOTOS") in shapes:                      # extreme shapes: refused from the header, by name
        buf = io.BytesIO()
        Image.new("L", shapes[inputs["PHOTOS"]]).save(buf, format="PNG")
        inputs = {**inputs, "PHOTOS": buf.getvalue()}
    req = {"PROMPT": _bytes(b"a man"), "PHOTOS": _bytes(inputs.get("PHOTOS", photo)), "MASKS": _bytes(mask),
           "WIDTH": (np.array([64], np.int32), "INT32"), "HEIGHT": (np.array([64], np.int32), "INT32"),
           "STEPS": (np.array([2], np.int32), "INT32")}
    if "FACE_INFO" in inputs:
        req["FACE_INFO"] = _bytes(inputs["FACE_INFO"].encode())
    if "SEED" in inputs:
        req["SEED"] = (np.array([inputs["SEED"]], np.int64), "INT64")
    if "INTERPOLATION" in inputs:
        req["INTERPOLATION"] = (np.array([inputs["INTERPOLATION"]], np.float32), "FP32")
    got, msg = _raw(server, "storymaker", req)
    assert got == code and text in msg and msg.startswith("invalid input: "), (got, msg)
    img, _ = client.generate("a man", characters=[MAN], **SMALL)       # and the server still serves
    assert img.shape == (64, 64, 3)


def test_sampler_checks_its_inputs_as_storymaker_does(server):
    """Shapes are Triton's to check (fixed dims in config.pbtxt); values are ours: non-finite embeddings, bad
    tokens and out-of-profile sizes are refused by the sampler as by storymaker."""
    tok = np.zeros((1, 40, 128), np.float32)
    emb = np.full((2, 77, 128), np.nan, np.float32)
    base = {"POOLED": (np.zeros((2, 64), np.float32), "FP32"), "IMAGE_TOKENS": (tok, "FP32"),
            "NEG_IMAGE_TOKENS": (tok, "FP32"), "WIDTH": (np.array([64], np.int32), "INT32"),
            "HEIGHT": (np.array([64], np.int32), "INT32")}
    code, msg = _raw(server, "sampler", {**base, "PROMPT_EMBEDS": (emb, "FP32")}, ("LATENTS",))
    assert code == "INVALID_ARGUMENT" and "PROMPT_EMBEDS contains NaN" in msg, msg
    ok = {**base, "PROMPT_EMBEDS": (np.zeros((2, 77, 128), np.float32), "FP32")}
    code, msg = _raw(server, "sampler", {**ok, "WIDTH": (np.array([1024], np.int32), "INT32")}, ("LATENTS",))
    assert code == "INVALID_ARGUMENT" and "width=1024 is outside" in msg, msg
    code, _ = _raw(server, "sampler", {**ok, "STEPS": (np.array([2], np.int32), "INT32")}, ("LATENTS",))
    assert code == "OK"


def test_missing_size_defaults_inside_the_build_profile(server, client):
    """The demo build's engines take 64..256 px: without WIDTH/HEIGHT a request gets the profile's optimal size
    (the release's 960x1280 where a build allows it) instead of an error."""
    tokens = client.encode_characters([MAN])
    img, _ = client.generate("a man", tokens=tokens, steps=2, seed=1)
    assert img.shape == (128, 128, 3)


class _FakePb:
    """The slice of triton_python_backend_utils that Glue.error uses."""

    class TritonError:
        INVALID_ARG, INTERNAL, CANCELLED, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "CANCELLED", "UNAVAILABLE"

        def __init__(self, message, code):
            self.msg, self.c = message, code

        def message(self):
            return self.msg

        def code(self):
            return self.c

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.error = error


class _Req:
    def request_id(self):
        return "req-42"


def test_error_codes_say_whose_fault_it_is(caplog):
    """Client mistakes: INVALID_ARG with the input named; our faults: INTERNAL with the request id (traceback in
    the server log under that id, not in the answer); a called model's error keeps its code."""
    from storymaker_serve.runtime.errors import InputError
    from storymaker_serve.runtime.serving.glue import CalleeError, Glue
    from storymaker_serve.runtime.serving.logic import Cancelled

    g = Glue(_FakePb)
    e = g.error(InputError("PROMPT is empty"), _Req()).error
    assert (e.c, e.msg) == ("INVALID_ARG", "invalid input: PROMPT is empty")
    with caplog.at_level("ERROR", logger="storymaker.triton"):
        try:
            raise KeyError("boom")
        except KeyError as exc:
            e = g.error(exc, _Req()).error
    assert e.c == "INTERNAL" and "request req-42" in e.msg and "boom" not in e.msg
    assert "req-42" in caplog.text and "Traceback" in caplog.text
    assert g.error(Cancelled("request cancelled before step 3/8")).error.c == "CANCELLED"
    for code, msg, want in (("UNAVAILABLE", "queue full", "UNAVAILABLE"),
                            ("INTERNAL", "invalid input: x", "INVALID_ARG"),
                            ("INTERNAL", "internal error (request 1): KeyError", "INTERNAL"),
                            ("INTERNAL", "request cancelled before step 2/8", "CANCELLED")):
        assert g.error(CalleeError("encode_characters", msg, code, _FakePb)).error.c == want, msg


@pytest.mark.slow
def test_launcher_refuses_a_repository_whose_backends_the_server_lacks(built):
    """The NGC repository needs the onnxruntime backend (tensorrt where engines exist); the bundled wheel server
    has only the Python backend: the launcher says which backend is missing, for which models, and the fix.
    Both repositories are complete."""
    from storymaker_serve.runtime.errors import StoryMakerError
    from storymaker_serve.runtime.serving.launcher import (
        REQUIRED_MODELS,
        TritonServer,
        check_repo,
        repo_backends,
        server_backends,
    )

    available, where = server_backends()
    ngc = built / "triton_repo_ngc"
    check_repo(ngc)                                              # complete: configs and model files
    check_repo(built / "triton_repo", available, where)          # served here
    needs = repo_backends(ngc)
    assert set(needs["onnxruntime"]) == {"clip_vision", "ppr", "text_encoder_1", "text_encoder_2", "unet", "controlnet",
                                         "vae_decoder"}
    assert set(needs["python"]) >= set(REQUIRED_MODELS) - set(needs["onnxruntime"])
    if "onnxruntime" in available:
        pytest.skip("this tritonserver has the onnxruntime backend")
    with pytest.raises(StoryMakerError, match=r"has no backend 'onnxruntime' \(for clip_vision, controlnet, ppr, "
                                              r"text_encoder_1, text_encoder_2, unet, vae_decoder\)"
                                              r".*NGC tritonserver container"):
        TritonServer(ngc)


def test_cancellation_is_checked_at_most_every_cancel_check_s(monkeypatch):
    """A served request's is_cancelled() is a round trip to the server: the loop asks before a step only when
    CANCEL_CHECK_S has passed since it last asked (every step where steps are slower), and stops when told."""
    from types import SimpleNamespace as NS

    import torch

    from storymaker_serve.export.demo_bundle import SDXL_SCHEDULER
    from storymaker_serve.runtime.pipeline import GenerateOptions, TextEmbeds
    from storymaker_serve.runtime.serving import logic

    class Zeros:                        # eps = 0 for the CFG batch, on the host
        device = None

        def prepare(self, inputs):
            pass

        def __call__(self, x, t):
            return torch.zeros_like(x)

    build = NS(scheduler_config={"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER}, vae_factor=8,
               latent_channels=4)
    opts = GenerateOptions(prompt="a man", width=64, height=64, steps=12)
    text = TextEmbeds(torch.zeros(2, 77, 8), torch.zeros(2, 4))
    tokens = torch.zeros(1, 40, 8), torch.zeros(1, 40, 8)
    asked = []

    def run(check_s, cancel_at=None):
        asked.clear()
        monkeypatch.setattr(logic, "CANCEL_CHECK_S", check_s)

        def is_cancelled():
            asked.append(1)
            return cancel_at is not None and len(asked) >= cancel_at
        return logic.generate_latents(opts, text, tokens, Zeros(), build, None, is_cancelled)

    run(0.0)
    assert len(asked) == 12                         # slower steps than the interval: asked before every step
    run(3600.0)
    assert len(asked) == 1                          # fast steps: asked once, before the first
    with pytest.raises(logic.Cancelled, match="before step 3/12"):
        run(0.0, cancel_at=3)

