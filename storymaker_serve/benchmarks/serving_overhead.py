"""What our serving code adds per image, at the released tensor sizes, with every engine replaced by a stand-in.

The whole served path runs as deployed: `python -m runtime.serve` in its own process (the launcher, its gateway and
the real tritonserver), the BLS models (`storymaker`,
`text_encoder`), the engine glue, the in-flight step batcher and the gRPC client, on a repository whose engines
answer at once with correctly shaped zeros (benchmarks/standin.py; the specs are the released
SDXL/StoryMaker ones, built from the configs on no device). So a frame's wall time here is serving overhead only:
BLS calls, copies, the UniPC arithmetic, decode post-processing, PNG, gRPC. Stand-ins say nothing about an engine's
speed or correctness; the engines' own time on a GPU is not in these figures.

    python -m benchmarks.serving_overhead [--quick] [--out build/serving_overhead]

Cases: 960x1280 (the release default), 25 steps, CFG 7.5, 1 and 2 characters (image tokens given, as a story sends
them after one encode_characters call), with and without a pose map, at concurrency 1/4/8, and the first case again
with 1 step (the per-image fixed cost; the rest is per step). Per case it reports the
wall time per image (1 / throughput), the p50 latency, the server's per-stage time per image (the `storymaker` stage
metrics), the UNet rows per execution, and the bytes one denoising step moves through BLS (counted from the shapes).
JSON lines into benchmarks/results/serving_overhead.jsonl, a chart into serving_overhead.png.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import tritonclient.grpc as grpcclient
from diffusers.configuration_utils import FrozenDict
from PIL import Image

from storymaker_serve.benchmarks import CHECKOUT, RESULTS
from storymaker_serve.benchmarks.processes import child_pids
from storymaker_serve.benchmarks.processes import cpu_seconds as process_cpu
from storymaker_serve.benchmarks.server_stats import model_stats, stage_metrics
from storymaker_serve.benchmarks.standin import FACTORY
from storymaker_serve.export.components import ExportProfile, build_specs, models_view
from storymaker_serve.export.demo_bundle import SDXL_SCHEDULER
from storymaker_serve.export.sdxl_config import SDXL_UNET
from storymaker_serve.export.tokenizer_gen import write_clip_tokenizer
from storymaker_serve.export.triton_repo import write_repo
from storymaker_serve.runtime.cli import argument_parser
from storymaker_serve.runtime.manifest import Manifest
from storymaker_serve.runtime.serving.client import StoryMakerClient
from storymaker_serve.runtime.serving.launcher import wait_until_ready
from storymaker_serve.runtime.serving.ports import free_port

GOAL_MS = 30.0
STAGES = ("characters", "text", "denoise", "vae", "png", "respond")


def write_standin_build(out: Path, engines: str = "bls", with_controlnet: bool = True) -> Path:
    """A build folder whose manifest holds the released component specs (SDXL UNet with StoryMaker's image
    tokens, both text encoders, CLIP-H, resampler, VAE, ControlNet) and stand-in engines
    (`deployment.engine_factory`, benchmarks/standin.py), plus its
    Python-backend Triton repository. No weights: the specs come from the released configs."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "assets").mkdir(parents=True)
    view = models_view(NS(config=FrozenDict(SDXL_UNET)), text_widths=(768, 1280), cross_attention_dim=2048)
    view.controlnet = with_controlnet or None
    prof = ExportProfile()
    specs = build_specs(view, prof)
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_clip_tokenizer(out / "assets" / sub, pad_token=pad)
    (out / "assets" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler",
                                                                      **SDXL_SCHEDULER}))
    comps = {n: {"spec": s.to_json(), "files": [{"path": f"stand-in/{n}", "sha256": "", "bytes": 0}],
                 "precision": "stand-in",
                 "profile": {k: {w: list(v) for w, v in p.items()} for k, p in s.profile().items()},
                 "engine": {}} for n, s in specs.items()}
    manifest = {"format": 1, "precision": "stand-in", "profile": vars(prof), "components": comps,
                "assets": {"tokenizer": "assets/tokenizer", "tokenizer_2": "assets/tokenizer_2",
                           "scheduler_config": "assets/scheduler_config.json"},
                "deployment": {"device": "cpu", "providers": ["cpu"], "gpu_instances": 1, "engine_factory": FACTORY,
                               "denoise_engines": engines}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    write_repo(out)
    return out


class DeployedServer:
    """`python -m runtime.serve --repo REPO` in a process of its own, as deployed (launcher, gateway and tritonserver
    there; the benchmark's clients here). A gateway started in the benchmark's own process would share the clients'
    GIL and count their Python time as the gateway's."""

    def __init__(self, repo: Path, gateway: bool = True):
        self.repo, self.gateway = Path(repo).resolve(), gateway
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.log_file = self.repo.parent / "serve.log"

    def __enter__(self) -> DeployedServer:
        cmd = [sys.executable, "-m", "runtime.serve", "--repo", str(self.repo), "--grpc-port", str(self.grpc_port),
               "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port)]
        self._log = open(self.log_file, "w")
        self.proc = subprocess.Popen(cmd + ([] if self.gateway else ["--no-gateway"]), stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=CHECKOUT)
        if not wait_until_ready(self.url, 600, self.proc):
            self.__exit__()
            raise RuntimeError(f"python -m runtime.serve did not become ready; log: {self.log_file}")
        return self

    def processes(self) -> dict[str, list[int]]:
        """pids per role: the launcher with its gateway, tritonserver, the Python-backend stubs."""
        server = child_pids(self.proc.pid, "tritonserver", recursive=True)
        return {"launcher_gateway": [self.proc.pid], "tritonserver": server,
                "stubs": [c for pid in server for c in child_pids(pid)]}

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()                   # the launcher stops tritonserver on SIGTERM
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def cpu_seconds(roles: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU seconds per role, summed over its processes."""
    return {role: sum(process_cpu(pid) for pid in pids) for role, pids in roles.items()}


def step_bytes(m, characters: int, pose: bool, width: int, height: int) -> dict[str, int]:
    """Bytes one denoising step of one request moves through BLS (inputs + outputs, fp32), counted from the specs of
    the build's manifest `m`: the UNet call, and with a pose map the ControlNet call and its residuals sent on to the
    UNet."""
    f, L = m.vae_factor, m.text_len
    values = {"N": 2, "h": height // f, "w": width // f, "S": L + 20 * (characters + 1)}
    size = lambda t: int(np.prod(t.shape(values))) * np.dtype(t.dtype).itemsize
    unet = m.component("unet").spec
    sent = [t for t in unet.inputs if pose or not t.zero_default]
    out = {"unet": sum(size(t) for t in sent) + sum(size(t) for t in unet.outputs)}
    if pose:
        cn = m.component("controlnet").spec
        values["S"] = L
        out["controlnet"] = sum(size(t) for t in cn.inputs) + sum(size(t) for t in cn.outputs)
    return out


WARM_UP = 3
# A fresh server's first ~15 frames at concurrency 1 take 30-40 ms, later ones 23-25 ms (measured with and without the
# gateway); the figures are a warm server's, so each server first answers this many frames of its first case
SERVER_WARM_UP = 20


def run_case(server, client, admin, characters: int, pose: bool, concurrency: int, per_client: int, steps: int,
             width: int, height: int, png: bool, pose_png: bytes, warm_up: int = WARM_UP) -> dict:
    d = 2048
    tok = np.zeros((1, 20 * (characters + 1), d), np.float32), np.zeros((1, 20 * (characters + 1), d), np.float32)
    opts = dict(width=width, height=height, steps=steps, png=png, **({"pose": pose_png} if pose else {}))
    for _ in range(warm_up):            # first calls per shape: plans, zero buffers, the request thread's arena
        client.generate("warm-up", tokens=tok, **opts)
    lat, lock, errors = [], threading.Lock(), []
    roles = {"client": [os.getpid()], **server.processes()}
    cpu0 = cpu_seconds(roles)
    m0, u0, c0 = stage_metrics(server.metrics_port), model_stats(admin, "unet"), model_stats(admin, "controlnet") \
        if pose else None

    def worker(k):
        for j in range(per_client):
            t = time.perf_counter()
            try:
                img, _ = client.generate("a man walks a dog in the park", tokens=tok, seed=k * 100 + j, **opts)
                assert img.shape == (height, width, 3)
            except Exception as e:  # noqa: BLE001 - counted, reported
                errors.append(repr(e))
            with lock:
                lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    n = concurrency * per_client
    cpu1 = cpu_seconds(roles)
    deadline = time.time() + 10
    while True:         # the model sends its metrics just after each response (off the request's path): all of them
        m1, u1 = stage_metrics(server.metrics_port), model_stats(admin, "unet")
        if m1.get("respond.count", 0) - m0.get("respond.count", 0) >= n - len(errors) or time.time() > deadline:
            break
        time.sleep(0.02)
    stages = {s: round(1000 * (m1.get(f"{s}.seconds", 0) - m0.get(f"{s}.seconds", 0)) / n, 2) for s in STAGES
              if m1.get(f"{s}.count", 0) > m0.get(f"{s}.count", 0)}
    rows, execs = u1["rows"] - u0["rows"], max(1, u1["executions"] - u0["executions"])
    b_rows = m1.get("unet.rows", 0) - m0.get("unet.rows", 0)           # the frame model's step batcher
    b_execs = max(1, m1.get("unet.executions", 0) - m0.get("unet.executions", 0))
    bytes_step = step_bytes(Manifest(server.repo.parent), characters, pose, width, height)
    rec = {"bench": "serving_overhead", "engines": "stand-in", "width": width, "height": height, "steps": steps,
           "characters": characters, "pose": pose, "png": png, "concurrency": concurrency, "images": n,
           "errors": len(errors), "ms_per_image": round(1000 * wall / n, 1),
           "ms_per_step": round(1000 * wall / n / steps, 2),
           "p50_latency_ms": round(1000 * sorted(lat)[len(lat) // 2], 1),
           "server_stage_ms_per_image": stages,
           "unet_rows_per_execution": round(b_rows / b_execs, 2),
           "unet_model_rows_per_execution": round(rows / execs, 2) if rows else None,
           "unet_model_ms_per_execution": round((u1["compute_ns"] - u0["compute_ns"]) / execs / 1e6, 2),
           "unet_queue_ms_per_execution": round((u1["queue_ns"] - u0["queue_ns"]) / execs / 1e6, 2),
           "bls_bytes_per_step": bytes_step, "bls_mb_per_image": round(sum(bytes_step.values()) * steps / 1e6, 1),
           "goal_ms_per_image": GOAL_MS,
           # CPU time per image of each process (all on the same cores here): where the wall time's work is done
           "cpu_ms_per_image": {k: round(1000 * (cpu1[k] - cpu0[k]) / n, 1) for k in roles}}
    if pose:
        c1 = model_stats(admin, "controlnet")
        executions = max(1, c1["executions"] - c0["executions"])
        rec["controlnet_rows_per_execution"] = round((c1["rows"] - c0["rows"]) / executions, 2)
    if errors:
        rec["first_error"] = errors[0][:300]
    return rec


def markdown(records: list[dict]) -> str:
    """The docs/performance.md table of a run's records."""
    rows = ["| engines | chars | pose | PNG | concurrency | steps | ms/image | ms/step | p50 latency ms "
            f"| server stages ms/image ({', '.join(STAGES)}) | UNet rows/exec | BLS MB/image (counted) "
            "| CPU ms/image (client, gateway, "
            "tritonserver, stubs) |", "| ---" * 13 + " |"]
    yn = lambda b: "yes" if b else "no"
    for r in records:
        st = r["server_stage_ms_per_image"]
        stages = ", ".join(f"{st[s]:.1f}" if s in st else "-" for s in STAGES)
        mb = 0 if r.get("denoise_engines") == "inprocess" else r["bls_mb_per_image"]
        c = r.get("cpu_ms_per_image", {})
        processes = ("client", "launcher_gateway", "tritonserver", "stubs")
        cpu = ", ".join(f"{c[k]:.0f}" if k in c else "-" for k in processes)
        rows.append(f"| {r.get('denoise_engines', 'bls')} | {r['characters']} | {yn(r['pose'])} | {yn(r['png'])} | "
                    f"{r['concurrency']} | {r['steps']} | {r['ms_per_image']:.0f} | {r['ms_per_step']:.2f} | "
                    f"{r['p50_latency_ms']:.0f} | "
                    f"{stages} | {r['unet_rows_per_execution']} | {mb} | {cpu} |")
    return "\n".join(rows)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps = max(r["steps"] for r in records)                    # not the 1-step (fixed cost) case
    records = [r for r in records if r.get("denoise_engines", "inprocess") == "inprocess" and r["steps"] == steps]
    cases = sorted({(r["characters"], r["pose"], r["png"]) for r in records})
    levels = sorted({r["concurrency"] for r in records})
    width = 0.8 / max(1, len(cases))
    for i, case in enumerate(cases):
        ys = [next((r["ms_per_image"] for r in records if (r["characters"], r["pose"], r["png"]) == case
                    and r["concurrency"] == c), 0) for c in levels]
        label = f"{case[0]} char{'s' if case[0] > 1 else ''}{', pose' if case[1] else ''}{', PNG' if case[2] else ''}"
        ax.bar([x + i * width for x in range(len(levels))], ys, width, label=label)
    ax.axhline(GOAL_MS, color="k", ls="--", lw=1, label=f"goal {GOAL_MS:.0f} ms/image")
    ax.set_xticks([x + width * (len(cases) - 1) / 2 for x in range(len(levels))], [f"concurrency {c}" for c in levels])
    ax.set_ylabel("serving overhead, ms per image (1 / throughput)")
    ax.set_title("Served path, stand-in engines in process, 960x1280, 25 steps (2-core CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    ap = argument_parser("python -m benchmarks.serving_overhead", __doc__)
    ap.add_argument("--quick", action="store_true", help="1 and 2 characters without pose, 1 with pose; concurrency 1 "
                                                         "and 8; one image per client (a few minutes)")
    ap.add_argument("--out", type=Path, default=Path("build/serving_overhead"), help="stand-in build folder")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--height", type=int, default=1280)
    ap.add_argument("--per-client", type=int, default=None, help="images per client (default 5, --quick 1; "
                    "x10 at concurrency 1)")
    ap.add_argument("--no-gateway", action="store_true", help="the client talks to tritonserver's own port")
    ap.add_argument("--engines", default="inprocess,bls",
                    help="where the frame model's UNet/ControlNet/VAE run (export.build --denoise-engines), "
                         "each measured")
    a = ap.parse_args(argv)
    # 5 per client (was 2): a case at concurrency 4-8 runs 20-40 images, 1-2 s, instead of a few hundred ms
    per_client = a.per_client or (1 if a.quick else 5)
    if a.quick:
        plan = {"inprocess": [(1, False, False, 1), (1, False, False, 8), (2, False, False, 1), (1, True, False, 1),
                              (1, False, True, 1)],
                "bls": [(1, False, False, 1), (1, False, False, 8)]}
    else:
        plan = {"inprocess": [(ch, False, False, c) for ch in (1, 2) for c in (1, 4, 8)]
                + [(1, True, False, 1), (2, True, False, 1), (1, True, False, 4), (1, False, True, 1),
                   (1, False, True, 8)],
                "bls": [(1, False, False, c) for c in (1, 4, 8)] + [(2, False, False, 1), (1, True, False, 1)]}
    buf = io.BytesIO()
    Image.fromarray(np.zeros((a.height, a.width, 3), np.uint8)).save(buf, format="PNG")
    records = []
    for engines in a.engines.split(","):
        print(f"writing the stand-in build (released specs, no weights, denoise_engines={engines}) to "
              f"{a.out / engines}", flush=True)
        build = write_standin_build(a.out / engines, engines)
        with DeployedServer(build / "triton_repo", gateway=not a.no_gateway) as server:
            client, admin = StoryMakerClient(server.url), grpcclient.InferenceServerClient(server.url)
            # the first case once more with 1 step: the per-image fixed cost (request, text, decode, the frame back
            # through the server, gateway and client), so the per-step cost is (25-step - 1-step) / 24
            warm = SERVER_WARM_UP                  # the first case of each server, then WARM_UP per case
            for ch, pose, png, conc, steps in [(*c, a.steps) for c in plan[engines]] + [(*plan[engines][0], 1)]:
                # ~8 s per image with the residuals via BLS; 10x the images at concurrency 1, where one image is short
                # (25-40 ms: a handful is within the host's noise)
                n_each = 1 if (engines == "bls" and pose) else per_client * (10 if conc == 1 else 1)
                rec = run_case(server, client, admin, ch, pose, conc, n_each, steps, a.width, a.height, png,
                               buf.getvalue(), warm)
                rec.update(quick=a.quick, denoise_engines=engines, gateway=not a.no_gateway, warm_up=warm)
                records.append(rec)
                warm = WARM_UP
                print(f"[{engines}] {ch} char, pose={pose}, png={png}, concurrency {conc}, {steps} steps: "
                      f"{rec['ms_per_image']} ms/image ({rec['ms_per_step']} ms/step), p50 {rec['p50_latency_ms']} ms, "
                      f"UNet rows/exec {rec['unet_rows_per_execution']}, stages {rec['server_stage_ms_per_image']}",
                      flush=True)
    a.results.mkdir(parents=True, exist_ok=True)
    with open(a.results / "serving_overhead.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if not a.quick:
        plot(records, a.results / "serving_overhead.png")
    print(markdown(records))
    return records


if __name__ == "__main__":
    main()
