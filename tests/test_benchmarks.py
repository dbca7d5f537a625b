"""The benchmark harness on a tiny config: JSON lines with every flag, versions, memory; charts. No timing asserted."""
import json

import pytest
import torch

from storymaker_serve.benchmarks import plot, run
from storymaker_serve.benchmarks.flops import peak_tflops

REQUIRED = {"backend", "weights", "size", "steps", "characters", "precision", "dual_attention_kernel", "channels_last",
            "fused_qkv", "offload_encoders", "vae_precision", "cuda_graph", "compile", "flops", "tflops_per_s",
            "pct_fp16_peak", "device_name", "torch", "git_commit", "median_s", "p90_s", "runs_s",
            "peak_host_rss_bytes", "peak_gpu_mem_bytes", "time"}


@pytest.mark.slow
def test_harness_writes_json_lines_and_charts(tmp_path, built):
    out = tmp_path / "runs.jsonl"
    lines = run.main(["--backends", "reference,torch-opt,onnxruntime", "--weights", "demo", "--build", str(built),
                      "--size", "64", "--steps", "2", "--repeats", "2", "--warmup", "1", "--channels-last",
                      "--fused-qkv", "--offload-encoders",
                      "--out", str(out)])
    stored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["backend"] for r in stored] == ["reference", "torch-opt", "onnxruntime"] == [r["backend"] for r in lines]
    for r in stored:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert len(r["runs_s"]) == 2 and r["median_s"] > 0 and r["peak_host_rss_bytes"] > 0
        served = r["backend"] == "onnxruntime"               # the served path encodes characters in one call
        want = {"encoders+ppr"} if served else {"encoders", "ppr"}
        assert set(r["stages_median_s"]) == want | {"text", "denoise", "vae"}
        assert r["channels_last"] is True and r["fused_qkv"] is True and r["size"] == 64
        assert r["flops"]["denoise"] == 2 * r["flops"]["unet_step"] > 0
        assert r["tflops_per_s"]["denoise"] > 0
        peak = peak_tflops(r["device_name"])                       # per device: a known GPU has a % of peak
        assert r["fp16_peak_tflops"] == peak and (r["pct_fp16_peak"] == {}) == (peak is None)
        assert 0 < r["frame_median_s"] < r["median_s"]
        if not served:
            assert r["dual_attention_kernel_ran"] is None          # not asked for: recorded as such
    for name in ("latency_by_backend.png", "speedup.png"):          # run draws the charts next to its results
        assert (tmp_path / name).stat().st_size > 1000
    pngs = plot.main(["--results", str(out), "--out", str(tmp_path / "again")])
    assert {p.name for p in pngs} == {"latency_by_backend.png", "speedup.png"}


def test_quick_flags():
    a = run.parse_args(["--quick"])
    assert a.backends == "reference,torch-opt,onnxruntime,triton" and a.weights == "demo" and a.steps == 8


@pytest.mark.slow
def test_flop_count_of_the_full_size_unet():
    """The random-full UNet counts SDXL's published 6.76 TFLOP per pass at 1024^2 (plus StoryMaker's image branch)."""
    from storymaker_serve.benchmarks.flops import image_flops, peak_tflops
    from storymaker_serve.export.random_models import random_full_models

    meta = random_full_models("meta")
    one, two = image_flops(meta, 1024, 1, 25), image_flops(meta, 1024, 2, 25)
    per_pass = one["unet_step"] / 2 / 1e12                         # CFG: batch 2
    assert 6.76 <= per_pass <= 6.76 * 1.02, per_pass
    assert one["denoise"] == 25 * one["unet_step"]
    assert two["unet_step"] > one["unet_step"] and two["encoders"] == 2 * one["encoders"]
    assert 9 < one["vae"] / 1e12 < 12 and one["text"] > 0 and one["ppr"] > 0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("cpu") is None


@pytest.mark.slow
def test_gpu_suite_plumbing_on_the_demo_bundle(tmp_path, built, monkeypatch):
    """`benchmarks.gpu_suite --tiny`: the e2e ladder and size sweep write one JSON line per run and a suite line per
    stage; a failing stage is recorded and does not stop the next one."""
    from storymaker_serve.benchmarks import gpu_suite

    monkeypatch.setattr(run, "_build", lambda a: built)
    rows = gpu_suite.main(["--tiny", "--stages", "e2e,kernel,sizes", "--results", str(tmp_path)])
    assert [r["stage"] for r in rows] == ["e2e", "kernel", "sizes"]
    assert rows[0]["ok"] and rows[2]["ok"]
    if torch.cuda.is_available():                                      # per device: the kernel stage runs on a GPU
        assert rows[1]["ok"], rows[1]
    else:
        assert rows[1]["ok"] is False and "CUDA" in rows[1]["error"]    # no GPU: recorded, not fatal
    lines = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in lines[:2]] == ["reference", "torch-opt"]
    assert len(lines) == 2 + len(gpu_suite.LADDER) + 4
    assert [r["fused_qkv"] for r in lines[2:2 + len(gpu_suite.LADDER)]] == [False, True, True, True]
    assert {(r["size"], r["characters"]) for r in lines[-4:]} == {(64, 1), (96, 1), (64, 2), (96, 2)}
    assert len((tmp_path / "suite.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_full_size_serve_script_runs_on_the_demo_build(tmp_path, built, capsys):
    """benchmarks.full_size_serve (the full-size serving measurement, docs/export.md) on the demo build: one storymaker
    frame, per-model stub memory, cold start. Only that it runs and reports; no figure asserted."""
    from storymaker_serve.benchmarks.full_size_serve import main

    main(["--build", str(built), "--models",
          "text_encoder,clip_vision,ppr,encode_characters,unet,vae_decoder,storymaker",
          "--size", "64", "--steps", "2", "--out", str(tmp_path / "r.json"), "--save", str(tmp_path / "f.png")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["requests"]["storymaker"]["image"] == [64, 64, 3] and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert {"unet", "storymaker", "encode_characters"} <= set(r["model_rss_ready_gib"]) and r["cold_start_s"] > 0
    assert r["requests"]["text_encoder"]["max_abs_vs_in_process"] <= 1e-5     # served text = the same sessions here


def test_serving_overhead_standin_build_has_the_released_shapes(tmp_path):
    """benchmarks.serving_overhead's stand-in build: the released specs (no weights), stand-in engines that answer
    with correctly shaped zeros, and the bytes a step moves through BLS counted from those shapes."""
    import numpy as np

    from storymaker_serve.benchmarks.serving_overhead import step_bytes, write_standin_build
    from storymaker_serve.benchmarks.standin import StandInEngine
    from storymaker_serve.runtime.serving.engines import Build

    b = Build(write_standin_build(tmp_path / "b", "inprocess"))
    assert (b.cross_attention_dim, b.pooled_dim, b.text_len, b.latent_channels, b.vae_factor) == (2048, 1280, 77, 4, 8)
    assert b.deployment["denoise_engines"] == "inprocess"
    assert 'string_value: "inprocess"' in (b.path / "triton_repo" / "storymaker" / "config.pbtxt").read_text()
    unet = b.engine("unet")
    assert isinstance(unet, StandInEngine)
    feeds = {"sample": np.zeros((2, 4, 160, 120), np.float32), "timestep": np.zeros(2, np.float32),
             "encoder_hidden_states": np.zeros((2, 117, 2048), np.float32),
             "text_embeds": np.zeros((2, 1280), np.float32),
             "time_ids": np.zeros((2, 6), np.float32), "ip_scale": np.zeros(2, np.float32)}
    assert unet.run(feeds)["noise_pred"].shape == (2, 4, 160, 120)
    image = b.engine("vae_decoder").run({"latent": np.zeros((1, 4, 160, 120), np.float32)})["image"]
    assert image.shape == (1, 3, 1280, 960)
    plain, pose = step_bytes(b, 1, False, 960, 1280), step_bytes(b, 1, True, 960, 1280)
    # sample + noise_pred 2x614400, encoder_hidden_states 2x117x2048x4, small vectors
    assert plain == {"unet": 2 * 614400 + 2 * 117 * 2048 * 4 + 4 * (2 + 2 * 1280 + 12 + 2)}
    assert pose["unet"] - plain["unet"] > 250e6 and "controlnet" in pose     # the residuals, when sent by BLS


def test_load_reports_the_fastest_and_slowest_clients_mean_latency():
    """Rejected requests do not count; an unfair schedule shows as a wide spread of per-client means."""
    from storymaker_serve.benchmarks.load import _client_spread

    results = [("ok", 1.0, 0), ("ok", 3.0, 0), ("ok", 5.0, 1), ("rejected: busy", 0.1, 1), ("ok", 7.0, 1)]
    assert _client_spread(results) == {"min": 2.0, "max": 6.0}
    assert _client_spread([("rejected: x", 1.0, 0)]) == {}
