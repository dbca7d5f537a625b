"""Bounded load test over a real tritonserver: throughput, latency and the UNet's dynamic-batching effect.

`python -m benchmarks.load --build build/demo` starts the server on loopback,
encodes one character once, then for each concurrency level runs that many
client threads, each sending a fixed number of `storymaker` requests (bounded
in count and time; it stops by itself). Per level it reports requests
answered/rejected (never lost), wall time, requests/s, p50/p90 latency, and
from the server's own statistics the UNet's average batch: rows executed per
UNet execution (2 = one CFG pair, i.e. no sharing; 4 = two requests' steps
shared one run). One JSON line per level goes to benchmarks/results/load.jsonl.
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
from storymaker_serve.runtime.cli import argument_parser
from storymaker_serve.runtime.errors import StoryMakerError
from storymaker_serve.runtime.serving.client import StoryMakerClient
from storymaker_serve.runtime.serving.launcher import TritonServer


def unet_stats(admin) -> tuple[int, int]:
    s = admin.get_inference_statistics("unet", as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def run_level(client, admin, tokens, concurrency: int, per_client: int, opts: dict) -> dict:
    results, lock = [], threading.Lock()

    def worker(k):
        for j in range(per_client):
            t = time.perf_counter()
            try:
                client.generate("a man in a park", tokens=tokens, seed=k * 1000 + j, **opts)
                status = "ok"
            except StoryMakerError as e:
                status = f"rejected: {str(e)[:80]}"
            with lock:
                results.append((status, time.perf_counter() - t))

    inf0, ex0 = unet_stats(admin)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    wall = time.perf_counter() - t0
    inf1, ex1 = unet_stats(admin)
    lat = np.array([r[1] for r in results if r[0] == "ok"])
    return {"concurrency": concurrency, "requests": concurrency * per_client, "answered": len(results),
            "ok": int(len(lat)), "rejected": len(results) - int(len(lat)), "wall_s": round(wall, 2),
            "req_per_s": round(len(results) / wall, 3), "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p90_s": round(float(np.percentile(lat, 90)), 3),
            "unet_rows_per_execution": round((inf1 - inf0) / max(1, ex1 - ex0), 2)}


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
                   **run_level(client, admin, tokens, c, a.per_client, opts), **opts,
                   "host": platform.node(), "cpus": __import__("os").cpu_count(), "backend": "triton (onnxruntime CPU)",
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
