"""In-flight batching on the real server (runtime/serving/batcher.py): concurrent requests share UNet executions,
and the in-process engine layout gives the frames of the BLS layout."""
import threading

import numpy as np
import pytest
from helpers import MAN, POSE, WOMAN

from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.serving.client import StoryMakerClient
from storymaker_serve.runtime.serving.launcher import TritonServer


def test_concurrent_requests_share_unet_executions(server, client):
    """In-flight batching (runtime/serving/batcher.py): 8 concurrent frames put their steps into shared UNet
    executions, at least 6 rows per execution on average (the profile allows 8), with one `storymaker`
    instance; each frame equals the one the same request gives alone (within 1 uint8 level: other batch sizes)."""
    import tritonclient.grpc as grpcclient

    admin = grpcclient.InferenceServerClient(server.url)

    def unet_stats():
        s = admin.get_inference_statistics("unet", as_json=True)["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])

    tokens = client.encode_characters([MAN])
    opts = dict(width=64, height=64, steps=12)
    alone = client.generate("a man", tokens=tokens, seed=5, png=False, **opts)[0]
    frames, (rows0, exec0) = {}, unet_stats()
    barrier = threading.Barrier(8)

    def worker(k):
        barrier.wait()
        frames[k] = client.generate("a man", tokens=tokens, seed=k, png=False, **opts)[0]
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    rows1, exec1 = unet_stats()
    assert rows1 - rows0 == 8 * 12 * 2                               # every step of every request, CFG pairs
    assert (rows1 - rows0) / (exec1 - exec0) >= 6, (rows1 - rows0, exec1 - exec0)
    assert np.abs(frames[5].astype(int) - alone.astype(int)).max() <= 1
    assert len({frames[k].tobytes() for k in range(8)}) == 8        # each request kept its own rows


@pytest.mark.slow
def test_inprocess_engines_give_the_same_frames(built, client, tmp_path):
    """denoise_engines=inprocess (export.build --denoise-engines): storymaker runs the UNet/ControlNet/VAE sessions
    itself; its frames equal the BLS layout's (within 1 uint8 level) for 2 characters with a pose map, also when
    two requests share the step batcher, and so does storymaker_stream's final frame after its preview."""
    import shutil

    repo = shutil.copytree(built / "triton_repo", tmp_path / "triton_repo", symlinks=True)
    for model in ("storymaker", "storymaker_stream"):
        cfg = repo / model / "config.pbtxt"
        text = cfg.read_text()
        assert 'key: "denoise_engines"\n  value {\n    string_value: "bls"' in text
        cfg.write_text(text.replace('string_value: "bls"', 'string_value: "inprocess"'))
    tokens = client.encode_characters([MAN, WOMAN])
    kw = dict(tokens=tokens, width=64, height=64, steps=4, png=False)
    want = [client.generate("two people", seed=s, pose=POSE.read_bytes(), **kw)[0] for s in (1, 2)]
    with TritonServer(repo) as srv:
        c2 = StoryMakerClient(srv.url)
        got = {}
        ts = [threading.Thread(target=lambda s=s: got.__setitem__(s, c2.generate("two people", seed=s,
                                                                                    pose=POSE.read_bytes(), **kw)[0]))
              for s in (1, 2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        events = list(c2.generate_stream("two people", seed=1, pose=POSE.read_bytes(), preview_every=2, **kw))
    for s, w in zip((1, 2), want):
        assert np.abs(got[s].astype(int) - w.astype(int)).max() <= 1
    # the stream model in process: a preview from the device-side x0, then the same frame
    assert [e["final"] for e in events] == [False, True] and events[0]["image"].shape == (8, 8, 3)
    assert np.abs(events[-1]["image"].astype(int) - want[0].astype(int)).max() <= 1


def test_io_binding_gives_the_session_outputs(built):
    """OrtEngine.run_bound (I/O binding over torch tensors, what the inprocess layout's loops call) returns what
    `run` returns for the same feeds, exactly: the UNet without residuals (zeros filled on the device) and with the
    ControlNet's residual tensors passed on as they came out, and the VAE. Its outputs are fresh tensors of the
    spec's shapes, two requests batched give each request's rows (within float32 tolerance), and a shape outside the
    engine profile is refused with the input named."""
    import torch

    from storymaker_serve.runtime.serving.engines import Build

    b = Build(built)
    unet, cn, vae = b.engine("unet"), b.engine("controlnet"), b.engine("vae_decoder")
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    h = w = 8
    feeds = {"sample": f32(2, 4, h, w), "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": f32(2, b.text_len + 40, b.cross_attention_dim),
             "text_embeds": f32(2, b.pooled_dim),
             "time_ids": np.tile(np.array([64, 64, 0, 0, 64, 64], np.float32), (2, 1)),
             "ip_scale": np.ones(2, np.float32)}
    cn_feeds = {**{k: feeds[k] for k in ("sample", "timestep", "text_embeds", "time_ids")},
                "encoder_hidden_states": feeds["encoder_hidden_states"][:, :b.text_len], "conditioning_scale":
                np.ones(2, np.float32), "controlnet_cond": rng.random((2, 3, 8 * h, 8 * w)).astype(np.float32)}
    tt = lambda d: {k: torch.from_numpy(v.copy()) for k, v in d.items()}
    res_np = cn.run(cn_feeds)
    res_t = cn.run_bound(tt(cn_feeds))
    assert set(res_t) == set(res_np) and all(np.array_equal(res_t[k].numpy(), v) for k, v in res_np.items())
    for residuals in ({}, res_np):
        want = unet.run({**feeds, **residuals})["noise_pred"]
        got = unet.run_bound({**tt(feeds), **(res_t if residuals else {})})["noise_pred"]
        assert isinstance(got, torch.Tensor) and np.array_equal(got.numpy(), want)
    assert not np.array_equal(unet.run(feeds)["noise_pred"], unet.run({**feeds, **res_np})["noise_pred"])
    lat = f32(1, 4, h, w)
    assert np.array_equal(vae.run_bound({"latent": torch.from_numpy(lat)})["image"].numpy(),
                          vae.run({"latent": lat})["image"])
    second = {**feeds, "sample": f32(2, 4, h, w)}                   # two requests' CFG pairs as one batch of 4
    both = unet.run_bound(tt({k: np.concatenate([feeds[k], second[k]]) for k in feeds}))["noise_pred"]
    alone = [unet.run_bound(tt(f))["noise_pred"] for f in (feeds, second)]
    np.testing.assert_allclose(both.numpy(), torch.cat(alone).numpy(), rtol=1e-4, atol=1e-5)
    big = unet.profile["sample"]["max"][-1] + 1                       # outside the profile: a clear error, no run
    with pytest.raises(InputError, match=r"unet: input sample has shape .* outside the engine profile"):
        unet.run_bound({**tt(feeds), "sample": torch.zeros(2, 4, h, big)})


def test_text_encoding_on_many_request_threads(built):
    """The frame models encode prompts on their request threads: concurrent TextEncoding calls give each prompt the
    ids it gets alone (the tokenizers keep padding settings as state; without the lock, calls came back unpadded)."""
    from storymaker_serve.runtime.serving.engines import Build
    from storymaker_serve.runtime.serving.logic import TextEncoding

    def encoder(f):
        ids = f["input_ids"]
        assert ids.shape[1:] == (77,), ids.shape                     # what Triton checks for the engine model
        return {"hidden_states": np.repeat(ids[..., None].astype(np.float32), 2, -1), "text_embeds": ids[:, :3] * 1.0}

    te = TextEncoding(Build(built), {"text_encoder": encoder, "text_encoder_2": encoder})
    prompts = [f"{'a man ' * (k % 5)}reading a book number {k}" for k in range(16)]
    alone = {p: te(p, "blurry")[0].prompt_embeds.numpy() for p in prompts}
    errors, barrier = [], threading.Barrier(8)

    def worker(k):
        barrier.wait()
        for j in range(24):
            p = prompts[(k + j) % len(prompts)]
            try:
                got = te(p, "blurry")[0].prompt_embeds.numpy()
                if not np.array_equal(got, alone[p]):
                    errors.append(p)
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                errors.append(repr(e))
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert errors == []
