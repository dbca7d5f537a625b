"""A real tritonserver on loopback serving the demo build: parity with the in-process pipeline, bad requests,
cancellation, a bounded load test and the security defaults."""
import io
import threading
import time

import numpy as np
import pytest
from helpers import CLOTH, MAN, POSE, THIRD, WOMAN, HostSyncs
from helpers import STORY as DEMO_STORY
from PIL import Image

from storymaker_serve.runtime.errors import StoryMakerError
from storymaker_serve.runtime.serving.client import StoryMakerClient
from storymaker_serve.runtime.serving.launcher import TritonServer

SMALL = dict(width=64, height=64, steps=3, seed=11)
STORY = [("one character", [MAN], {}), ("two characters", [MAN, WOMAN], {}),
         ("three characters", [MAN, WOMAN, THIRD], {}),
         ("cloth", [{**MAN, "cloth": CLOTH}, WOMAN], {}), ("pose", [MAN, WOMAN], {"pose": POSE})]


@pytest.fixture(scope="module")
def reference(built):
    """The reference: the release's unfused LoRA processors, eager, fp32."""
    from storymaker_serve.runtime.loaders import load_storymaker
    from storymaker_serve.runtime.pipeline import StoryMakerPipeline
    from storymaker_serve.runtime.weights import WeightsLayout

    return StoryMakerPipeline(load_storymaker(WeightsLayout.from_dir(built / "demo_bundle"), fuse=False))


def _chars(spec):
    from storymaker_serve.runtime.characters import Character

    return [Character.load(c["photo"], c["mask"], c.get("face"), c.get("cloth"), mask_channel=c.get("mask_channel", 0))
            for c in spec]


def _request(spec):
    from storymaker_serve.runtime.serving.request import CharacterRequest

    raw = lambda key: [c[key].read_bytes() if c.get(key) else None for c in spec]
    faces = [c["face"].read_text() if c.get("face") else None for c in spec]
    return CharacterRequest(raw("photo"), raw("mask"), raw("cloth"), faces, [c.get("mask_channel", 0) for c in spec])


@pytest.mark.parametrize("case,chars,extra", STORY, ids=[s[0] for s in STORY])
def test_four_paths_agree_with_the_reference(built, client, reference, case, chars, extra):
    """One frame through every path: the reference (unfused release processors), torch-opt (fused, fp32),
    the build's engines in process (onnxruntime) and the real tritonserver; each within 1 uint8 level of the
    reference, for 1, 2 and 3 characters, a clothing swap and a pose map."""
    from storymaker_serve.runtime.fast import FastOptions, FastPipeline
    from storymaker_serve.runtime.loaders import load_storymaker
    from storymaker_serve.runtime.pipeline import GenerateOptions
    from storymaker_serve.runtime.preprocess import decode_image
    from storymaker_serve.runtime.serving.engines import Build
    from storymaker_serve.runtime.serving.logic import EnginePipeline
    from storymaker_serve.runtime.weights import WeightsLayout

    prompt = f"{case}: friends in a park"
    pose = decode_image(extra["pose"]) if "pose" in extra else None
    opts = GenerateOptions(prompt, negative_prompt="blurry", pose_image=pose, **SMALL)
    ref = reference.generate(opts, reference.encode_characters(_chars(chars)))
    fast = FastPipeline(load_storymaker(WeightsLayout.from_dir(built / "demo_bundle")), FastOptions(precision="fp32"))
    engines = EnginePipeline(Build(built))
    served, _ = client.generate(prompt, characters=chars, negative_prompt="blurry", **extra, **SMALL)
    frames = {"torch-opt": fast.generate(opts, fast.encode_characters(_chars(chars))),
              "onnxruntime": engines.generate(opts, engines.encode_characters(_request(chars))), "triton": served}
    assert ref.shape == (64, 64, 3)
    for path, img in frames.items():
        assert img.shape == ref.shape and img.dtype == np.uint8, path
        assert np.abs(img.astype(int) - ref).max() <= 1, (path, np.abs(img.astype(int) - ref).max())


def test_served_loop_never_reads_back_to_the_host(built):
    """The served loop (runtime.denoise.denoise with the engine denoiser, as in the sampler/storymaker models) makes
    no host read per step: the dispatch probe of tests/test_fast.py sees no .item()/nonzero/device-to-host copy."""

    from storymaker_serve.runtime.pipeline import GenerateOptions
    from storymaker_serve.runtime.serving.engines import Build
    from storymaker_serve.runtime.serving.logic import EnginePipeline

    ep = EnginePipeline(Build(built))
    tokens = ep.encode_characters(_request([MAN]))
    opts = GenerateOptions("a man", **SMALL)
    ep.latents(opts, tokens)                                     # the UniPC plan: host arithmetic, once per steps
    with HostSyncs() as probe:
        ep.latents(opts, tokens)
    assert probe.ops == []


def test_served_frame_png_matches_image(client):
    img, info = client.generate("a man and a woman in a park", characters=[MAN, WOMAN], **SMALL)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(info["png"]))), img) and not info["truncated"]


def test_encode_once_then_frames_equals_full_requests(client):
    tokens = client.encode_characters([MAN, WOMAN])
    assert tokens[0].shape == tokens[1].shape == (1, 60, 128)
    for seed, prompt in [(1, "walking"), (2, "in a cafe"), (3, "on a bridge")]:
        cached, _ = client.generate(prompt, tokens=tokens, **{**SMALL, "seed": seed})
        full, _ = client.generate(prompt, characters=[MAN, WOMAN], **{**SMALL, "seed": seed})
        assert np.array_equal(cached, full)


def _png(size=(32, 32), value=255, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


BAD = [
    ("missing prompt", dict(prompt=""), "prompt is missing"),
    ("undecodable image", dict(characters=[{**MAN, "photo": b"not an image"}]), "cannot decode image"),
    ("empty mask", dict(characters=[{**MAN, "mask": _png((448, 640), 0, "L")}]), "mask is empty"),
    ("size mismatch", dict(characters=[{**MAN, "mask": _png((100, 100))}]), "mask is 100x100 but the photo is 448x640"),
    ("4 characters", dict(characters=[MAN, WOMAN, MAN, WOMAN]), "4 characters given"),
    ("outside profile", dict(width=1024), "width=1024 is outside this engine's profile"),
    ("not multiple of 8", dict(height=60), "height=60 must be a positive multiple of 8"),
    ("steps <= 0", dict(steps=0), "steps must be >= 1"),
]


@pytest.mark.parametrize("case,kw,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_clear_error_and_server_keeps_serving(client, case, kw, msg):
    args = {"prompt": "a man", "characters": [MAN], **SMALL, **kw}
    with pytest.raises(StoryMakerError, match=msg):
        client.generate(args.pop("prompt"), **args)
    img, _ = client.generate("a man", characters=[MAN], **{**SMALL, "steps": 1})   # still serving
    assert img.shape == (64, 64, 3)


def test_nan_embeddings_and_long_prompt(client):
    pos, neg = client.encode_characters([MAN])
    bad = pos.copy()
    bad[0, 3, 5] = np.nan
    with pytest.raises(StoryMakerError, match="NaN"):
        client.generate("a man", tokens=(bad, neg), **SMALL)
    _, info = client.generate(" ".join(["cat"] * 120), tokens=(pos, neg), **SMALL)
    assert info["truncated"] is True          # cut to 77 tokens, as SDXL does, and flagged


def test_cancellation_stops_the_denoising_loop(server, client):
    import tritonclient.grpc as grpcclient

    admin = grpcclient.InferenceServerClient(server.url)
    unet_count = lambda: int(admin.get_inference_statistics("unet", as_json=True)["model_stats"][0]["inference_count"])
    done = threading.Event()
    handle = client.generate_async("a man", lambda result, error: done.set(), characters=[MAN],
                                   **{**SMALL, "steps": 200})
    t0 = unet_count()
    deadline = time.time() + 60
    while unet_count() < t0 + 6 and time.time() < deadline:   # a few denoising steps have run
        time.sleep(0.05)
    handle.cancel()
    time.sleep(1.0)
    after_cancel = unet_count()
    time.sleep(2.0)
    assert unet_count() - after_cancel <= 2 * 2     # at most a step or two (each step = 2 CFG rows) after cancel
    assert unet_count() - t0 < 2 * 200 // 2          # far from the 200 requested steps
    img, _ = client.generate("a man", characters=[MAN], **SMALL)   # the next request is served
    assert img.shape == (64, 64, 3)


def test_stream_sends_previews_then_the_same_frame(client):
    """storymaker_stream over gRPC: a preview every 3 of 8 steps (at 3 and 6: one pixel per latent, in order),
    then the frame, which equals what storymaker returns for the same request."""
    events = list(client.generate_stream("a man", characters=[MAN], preview_every=3, **{**SMALL, "steps": 8}))
    previews, final = events[:-1], events[-1]
    assert [e["steps_done"] for e in previews] == [3, 6] and not any(e["final"] for e in previews)
    assert all(e["image"].shape == (64 // 8, 64 // 8, 3) and e["image"].dtype == np.uint8 for e in previews)
    assert not np.array_equal(previews[0]["image"], previews[1]["image"])        # the frame forms between previews
    img, info = client.generate("a man", characters=[MAN], **{**SMALL, "steps": 8})
    assert final["final"] and final["steps_done"] == 8 and np.array_equal(final["image"], img)
    assert final["png"] == info["png"] and final["truncated"] == info["truncated"]
    none = list(client.generate_stream("a man", characters=[MAN], preview_every=0, **{**SMALL, "steps": 8}))
    assert len(none) == 1 and np.array_equal(none[0]["image"], img)
    with pytest.raises(StoryMakerError, match="PREVIEW_EVERY=-1"):
        list(client.generate_stream("a man", characters=[MAN], preview_every=-1, **SMALL))


def test_png_encode_is_optional(client):
    """png=False (ENCODE_PNG false) returns the same raw frame and an empty PNG: no encode on the request's path."""
    img, info = client.generate("a man", characters=[MAN], **SMALL)
    raw, none = client.generate("a man", characters=[MAN], png=False, **SMALL)
    assert np.array_equal(img, raw) and none["png"] == b"" and info["png"][:4] == b"\x89PNG"


def test_cancelling_a_stream_stops_the_loop(server, client):
    """Closing the stream after its first preview cancels the request: the UNet stops within a step or two."""
    import tritonclient.grpc as grpcclient

    admin = grpcclient.InferenceServerClient(server.url)
    unet_count = lambda: int(admin.get_inference_statistics("unet", as_json=True)["model_stats"][0]["inference_count"])
    t0 = unet_count()
    stream = client.generate_stream("a man", characters=[MAN], preview_every=2, **{**SMALL, "steps": 200})
    first = next(stream)
    assert not first["final"] and first["steps_done"] == 2
    stream.close()                                   # cancels the request
    time.sleep(1.0)
    after_cancel = unet_count()
    time.sleep(2.0)
    assert unet_count() - after_cancel <= 2 * 2 and unet_count() - t0 < 2 * 200 // 2
    img, _ = client.generate("a man", characters=[MAN], **SMALL)   # the next request is served
    assert img.shape == (64, 64, 3)


def test_client_cli_streams_and_saves_previews(server, tmp_path, capsys):
    """runtime.client --previews DIR: each frame streams, its previews are saved and printed, the frames are written."""
    from storymaker_serve.runtime.serving.client import main

    assert main([str(DEMO_STORY), "--url", server.url, "--previews", str(tmp_path / "pv"),
                 "--preview-every", "2", "--steps", "5", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "frame 1/3: step 2 preview" in out and "step 4 preview" in out
    assert sorted(p.name for p in (tmp_path / "pv").iterdir())[:2] == ["frame_01_step_002.png", "frame_01_step_004.png"]
    assert len(list((tmp_path / "pv").iterdir())) == 6 and (tmp_path / "out" / "frame_03.png").exists()


def test_latent_preview_fit_recovers_a_linear_decoder():
    """The preview map is a least-squares fit to the decoder: exact when the decoder is itself linear per pixel."""
    import torch

    from storymaker_serve.runtime.serving.frame import LatentPreview

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32) * 0.1
    b = np.array([0.5, 0.4, 0.6], np.float32)
    vae01 = lambda lat: np.repeat(np.repeat(np.einsum("nchw,cr->nrhw", lat, w) + b[None, :, None, None], 8, 2), 8, 3)
    p = LatentPreview.fit(vae01, 4, (6, 5), 8)
    assert np.allclose(p.weight, w, atol=1e-5) and np.allclose(p.bias, b, atol=1e-5)
    x0 = torch.randn(1, 4, 6, 5)
    want = np.clip(np.einsum("chw,cr->hwr", x0[0].numpy(), w) + b, 0, 1) * 255
    assert np.abs(p(x0).astype(float) - want).max() <= 0.5 + 1e-3


def test_bounded_load_none_lost(client, capsys):
    tokens = client.encode_characters([MAN])
    n_clients, per_client = 8, 3
    results, lock = [], threading.Lock()

    def worker(k):
        for j in range(per_client):
            t = time.perf_counter()
            try:
                img, _ = client.generate("a man", tokens=tokens, width=64, height=64, steps=2, seed=k * 10 + j)
                status = "ok" if img.shape == (64, 64, 3) else "bad shape"
            except StoryMakerError as e:
                status = f"rejected: {e}"
            with lock:
                results.append((status, time.perf_counter() - t))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    wall = time.perf_counter() - t0
    assert len(results) == n_clients * per_client                     # every request answered
    ok = [r for r in results if r[0] == "ok"]
    # a bounded load far inside the queue limits (64 queued, 120 s): every request must succeed, not just answer
    assert len(ok) == len(results), [r[0] for r in results if r[0] != "ok"][:3]
    lat = sorted(r[1] for r in ok)
    with capsys.disabled():
        print(f"\nload test: {n_clients} clients x {per_client} requests: {len(ok)} ok, {len(results) - len(ok)} "
              f"rejected, {wall:.1f} s wall, {len(results) / wall:.2f} req/s, p50 {lat[len(lat) // 2]:.2f} s, "
              f"max {lat[-1]:.2f} s")


def test_security_defaults(server, built):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from storymaker_serve.runtime.serving.launcher import server_command

    cmd, _ = server_command(built / "triton_repo", 1, 2, 3, "127.0.0.1", "k", built)
    assert {"--model-control-mode=none", "--grpc-address=127.0.0.1", "--http-address=127.0.0.1",
            "--metrics-address=127.0.0.1"} <= set(cmd)
    c = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException):             # no remote model loading
        c.load_model("unet", headers={"triton-grpc-protocol-admin-key": server.admin_key})
    with pytest.raises(InferenceServerException):             # admin protocol without the key
        c.get_model_repository_index()
    assert c.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": server.admin_key}).models
    with pytest.raises(InferenceServerException):
        c.get_log_settings()
    assert c.is_model_ready("storymaker")                     # inference/health stay open


def test_decompression_bomb_and_oversized_bytes_rejected(client):
    bomb = _png((5000, 5000), 0, "L")                         # 25 MP in a few kB
    with pytest.raises(StoryMakerError, match="exceeds the limit"):
        client.generate("a man", characters=[{**MAN, "photo": bomb, "mask": bomb}], **SMALL)
    with pytest.raises(StoryMakerError, match="exceeds the limit"):
        client.encode_characters([{**MAN, "photo": b"\0" * (33 << 20)}])
    img, _ = client.generate("a man", characters=[MAN], **{**SMALL, "steps": 1})
    assert img.shape == (64, 64, 3)


def test_server_listens_on_loopback_only(server):
    """Every listening socket of the server's three ports is bound to 127.0.0.1 (/proc/net/tcp)."""
    ports = {server.grpc_port, server.http_port, server.metrics_port}
    seen = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, port = local.split(":")
            if state == "0A" and int(port, 16) in ports:            # LISTEN
                seen[int(port, 16)] = addr
    assert set(seen) == ports
    # 127.0.0.1 and ::ffff:127.0.0.1 (hex, as the kernel writes)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    assert set(seen.values()) <= loopback, seen


@pytest.mark.slow
def test_launcher_rejects_incomplete_repository(tmp_path, built, capsys):
    import shutil

    from storymaker_serve.runtime.serving.launcher import main as serve_main

    repo = tmp_path / "repo"
    shutil.copytree(built / "triton_repo", repo)
    shutil.rmtree(repo / "unet")
    with pytest.raises(StoryMakerError, match=r"incomplete Triton repository \(missing \['unet'\]\)"):
        TritonServer(repo)
    assert serve_main(["--repo", str(repo)]) == 2
    assert "export.build" in capsys.readouterr().err


def test_http_protocol_gives_the_grpc_frame(server, client):
    """The client over HTTP (tritonclient.http) sends the same typed inputs and gets the same frame as over gRPC."""
    http = StoryMakerClient(f"{server.address}:{server.http_port}", protocol="http", retries=1)
    tokens = client.encode_characters([MAN])
    a, _ = client.generate("a man", tokens=tokens, negative_prompt="blurry", controlnet_scale=1.0, **SMALL)
    b, info = http.generate("a man", tokens=tokens, negative_prompt="blurry", controlnet_scale=1.0, **SMALL)
    assert np.array_equal(a, b) and not info["truncated"]
    with pytest.raises(StoryMakerError, match="width=1024 is outside"):
        http.generate("a man", tokens=tokens, **{**SMALL, "width": 1024})


def test_stage_timings_are_exposed_as_metrics(server, client):
    """Where a request spent its time: per-stage seconds and counts of the storymaker model on the Prometheus
    metrics port (Python backend custom metrics)."""
    import urllib.request

    client.generate("a man", characters=[MAN], **SMALL)
    events = list(client.generate_stream("a man", characters=[MAN], preview_every=0, **SMALL))
    assert events[-1]["final"]
    deadline = time.time() + 10
    while True:                       # sent by the models just after the response (off the request's path)
        text = urllib.request.urlopen(f"http://{server.address}:{server.metrics_port}/metrics",
                                      timeout=10).read().decode()
        stages, stream = {}, {}
        for line in text.splitlines():
            if line.startswith("storymaker_stage_seconds_total{"):
                into = stages if 'model="storymaker"' in line else stream if 'model="storymaker_stream"' in line else {}
                into[line.split('stage="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        if ("respond" in stages and "respond" in stream) or time.time() > deadline:
            break
        time.sleep(0.05)
    assert {"denoise", "vae", "respond"} <= set(stream), text[-2000:]     # the stream model sends its own too
    assert set(stages) >= {"characters", "text", "denoise", "vae", "png", "respond"}, text[-2000:]
    assert stages["denoise"] > 0 and all(v >= 0 for v in stages.values())
    assert any(line.startswith("storymaker_stage_count_total{") for line in text.splitlines())
