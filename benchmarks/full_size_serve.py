"""Serve a full-size build's engine models on the real tritonserver and time one request each (not part of CI).

`python -m benchmarks.full_size_serve --build B --models unet,vae_decoder` puts
the chosen models of `B/triton_repo` (links, the models read the build folder)
in a repository of their own, starts the bundled tritonserver behind the
gateway exactly as `runtime.serve` does, and records: cold start (process start
to ready, which includes onnxruntime loading every session), the resident
memory of the server tree (server + Python-backend stubs) once ready and after
the requests, and for each model one request at its profile's minimum shapes
over gRPC (wall time, output finite). Optional inputs (the UNet's ControlNet
residuals) are left out, as the sampler sends them. One JSON object goes to
stdout and to --out. Memory comes from /proc, time from perf_counter: measured
here, on this CPU; no GPU figure.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np


def tree_rss_gib(pid: int) -> float:
    """RSS of process `pid` and its children (tritonserver and its stubs), GiB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if stat.parent.name == str(pid) or fields[1] == str(pid):
                total += int((stat.parent / "status").read_text().split("VmRSS:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return round(total / 2**20, 2)


def main(argv=None) -> None:
    import tritonclient.grpc as grpcclient

    from runtime.cli import argument_parser
    from runtime.manifest import Manifest
    from runtime.serving.launcher import TritonServer

    ap = argument_parser("python -m benchmarks.full_size_serve", __doc__)
    ap.add_argument("--build", type=Path, required=True, help="a full-size build folder (manifest.json, triton_repo/)")
    ap.add_argument("--models", default="unet", help="comma-separated engine models to serve")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args(argv)
    man = Manifest(a.build)
    names = a.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            (Path(tmp) / n).symlink_to((a.build / "triton_repo" / n).resolve())
        srv = TritonServer(tmp, required_models=names)
        t0 = time.perf_counter()
        srv.start(timeout=1800)
        report = {"models": names, "cold_start_s": round(time.perf_counter() - t0, 1),
                  "server_rss_ready_gib": tree_rss_gib(srv.proc.pid), "requests": {}}
        try:
            c = grpcclient.InferenceServerClient(srv.url, channel_args=[("grpc.max_receive_message_length", -1)])
            for n in names:
                spec = man.component(n).spec
                values = spec.assignment("min")
                feeds = {k: v for k, v in spec.sample_inputs(values, seed=0).items()
                         if not spec.input(k).zero_default}
                ins = []
                for k, v in feeds.items():
                    v = v.reshape(-1, 1) if v.ndim == 1 else v          # (N,) vectors travel as [N, 1] (batched model)
                    i = grpcclient.InferInput(k, list(v.shape), "FP32" if v.dtype == np.float32 else "INT64")
                    i.set_data_from_numpy(v)
                    ins.append(i)
                t = time.perf_counter()
                r = c.infer(n, ins, client_timeout=1800)
                secs = time.perf_counter() - t
                outs = {o.name: r.as_numpy(o.name) for o in spec.outputs}
                report["requests"][n] = {"shapes": values, "seconds": round(secs, 2),
                                         "outputs": {k: list(v.shape) for k, v in outs.items()},
                                         "finite": bool(all(np.isfinite(v).all() for v in outs.values()))}
            report["server_rss_after_gib"] = tree_rss_gib(srv.proc.pid)
        finally:
            srv.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
