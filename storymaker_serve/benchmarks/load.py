"""Bounded load test over a real tritonserver: throughput, latency and the UNet's dynamic-batching effect.

`python -m benchmarks.load --build build/demo` starts the server on loopback,
encodes one character once, then for each concurrency level runs that many
client threads, each sending a fixed number of `storymaker` requests, or
requests for `--duration` seconds (it stops by itself). Per level it reports
requests answered/rejected (never lost), wall time, requests/s, p50/p90/p99/max
latency, from the server's own statistics the UNet's average batch (rows per
UNet execution: 2 = one CFG pair, i.e. no sharing; 4 = two requests' steps
shared one run), and where a request's time went: per model the queue and
compute milliseconds per request, and the storymaker model's stages (its
metrics), and the fastest and slowest client's mean latency (far apart: the tail is
unfair scheduling, not slow requests). One JSON line per level goes to benchmarks/results/load.jsonl.
Equivalent with NVIDIA's tool (Triton SDK container; not installable here):
`perf_analyzer -m storymaker -u 127.0.0.1:8001 -i grpc --concurrency-range 1:8
--input-data story_inputs.json`.
"""
from __future__ import annotations

import json
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from storymaker_serve.benchmarks import CHECKOUT, RESULTS, TEST_DATA
from storymaker_serve.benchmarks.server_stats import model_stats, stage_metrics
from storymaker_serve.runtime.cli import argument_parser
from storymaker_serve.runtime.errors import StoryMakerError
from storymaker_serve.runtime.serving.client import StoryMakerClient
from storymaker_serve.runtime.serving.launcher import TritonServer

MODELS = ("storymaker", "text_encoder", "unet", "vae_decoder")


def run_level(client, admin, tokens, concurrency: int, per_client: int, opts: dict, duration_s: float = 0.0,
              metrics_port: int | None = None) -> dict:
    """`concurrency` client threads, each sending `per_client` requests, or requests until `duration_s` has passed
    when it is set. Latency percentiles, the UNet's mean batch and, per request, each model's queue and compute
    milliseconds (and the storymaker stages' when `metrics_port` is given)."""
    results, lock = [], threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def worker(k):
        j = 0
        while (j < per_client) if not duration_s else (time.perf_counter() < stop_at):
            j += 1
            t = time.perf_counter()
            try:
                client.generate("a man in a park", tokens=tokens, seed=k * 1000 + j, **opts)
                status = "ok"
            except StoryMakerError as e:
                status = f"rejected: {str(e)[:80]}"
            with lock:
                results.append((status, time.perf_counter() - t, k))

    before = {m: model_stats(admin, m) for m in MODELS}
    stages0 = stage_metrics(metrics_port) if metrics_port else {}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600 + duration_s)
    wall = time.perf_counter() - t0
    after = {m: model_stats(admin, m) for m in MODELS}
    lat = np.array([r[1] for r in results if r[0] == "ok"])
    n = max(1, len(results))
    unet = {k: after["unet"][k] - before["unet"][k] for k in after["unet"]}
    row = {"concurrency": concurrency, "requests": len(results) if duration_s else concurrency * per_client,
           "duration_s": duration_s or None, "answered": len(results), "ok": int(len(lat)),
           "rejected": len(results) - int(len(lat)), "wall_s": round(wall, 2),
           "req_per_s": round(len(results) / wall, 3),
           **{f"p{q}_s": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)},
           "max_s": round(float(lat.max()), 3),
           "client_mean_s": _client_spread(results),
           "unet_rows_per_execution": round(unet["rows"] / max(1, unet["executions"]), 2),
           "ms_per_request": {m: {"queue": round((after[m]["queue_ns"] - before[m]["queue_ns"]) / n / 1e6, 1),
                                  "compute": round((after[m]["compute_ns"] - before[m]["compute_ns"]) / n / 1e6, 1)}
                              for m in MODELS}}
    if metrics_port:
        stages1 = stage_metrics(metrics_port)
        row["storymaker_stage_ms_per_request"] = {
            k.removesuffix(".seconds"): round((v - stages0.get(k, 0.0)) / n * 1e3, 1)
            for k, v in sorted(stages1.items()) if k.endswith(".seconds")}
    return row


def _client_spread(results: list) -> dict:
    """The fastest and slowest client's mean latency: far apart, the tail is some clients served before others
    (unfair scheduling) rather than every request sometimes slow."""
    per: dict[int, list[float]] = {}
    for status, dt, k in results:
        if status == "ok":
            per.setdefault(k, []).append(dt)
    means = [float(np.mean(v)) for v in per.values()]
    return {"min": round(min(means), 3), "max": round(max(means), 3)} if means else {}


def _without_unet_batching(repo: Path) -> Path:
    copy = Path(tempfile.mkdtemp(prefix="repo-nobatch-")) / "triton_repo"
    shutil.copytree(repo, copy)
    cfg = text_format.Parse((copy / "unet/config.pbtxt").read_text(), pb.ModelConfig())
    cfg.ClearField("dynamic_batching")
    (copy / "unet/config.pbtxt").write_text(text_format.MessageToString(cfg))
    return copy


def main(argv=None) -> None:
    ap = argument_parser("python -m benchmarks.load", __doc__)
    ap.add_argument("--build", type=Path, default=CHECKOUT / "build/demo")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--per-client", type=int, default=10)
    ap.add_argument("--duration", type=float, default=0.0,
                    help="seconds per level: each client sends requests until then (instead of --per-client)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--unet-batching", choices=("on", "off"), default="on",
                    help="off: serve a copy of the repository whose unet has no dynamic batching (for comparison)")
    a = ap.parse_args(argv)
    out = RESULTS / "load.jsonl"
    opts = {"width": a.size, "height": a.size, "steps": a.steps}
    repo = a.build / "triton_repo" if a.unet_batching == "on" else _without_unet_batching(a.build / "triton_repo")
    with TritonServer(repo) as srv:
        client, admin = StoryMakerClient(srv.url), grpcclient.InferenceServerClient(srv.url)
        data = TEST_DATA
        tokens = client.encode_characters([{"photo": data / "ldh.png", "mask": data / "ldh_mask.png",
                                            "face": data / "ldh.face.json"}])
        client.generate("warm-up", tokens=tokens, **opts)                       # explicit warm-up
        for c in (int(x) for x in a.concurrency.split(",")):
            row = {"bench": "load", "unet_batching": a.unet_batching,
                   **run_level(client, admin, tokens, c, a.per_client, opts, a.duration, srv.metrics_port), **opts,
                   "host": platform.node(), "cpus": __import__("os").cpu_count(), "backend": "triton (onnxruntime CPU)",
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
