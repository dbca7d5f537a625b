"""Serve a full-size build's engine models on the real tritonserver and time one request each (not part of CI).

`python -m benchmarks.full_size_serve --build B --models unet,vae_decoder` puts
the chosen models of `B/triton_repo` (links, the models read the build folder)
in a repository of their own, starts the bundled tritonserver behind the
gateway exactly as `runtime.serve` does, and records: cold start (process start
to ready, which includes onnxruntime loading every session), the resident
memory of the server tree and of each model's Python-backend stub once ready
and after the requests, and one request per model over gRPC (wall time, output
finite): `encode_characters` on a test photo and mask, `text_encoder` on a
prompt, `storymaker` (a whole frame: characters, text, loop, VAE) on the
same photo at --size for --steps steps, `sampler` (the served UniPC loop calling `unet` by BLS) on random
embeddings at --size for --steps steps, then `vae_decoder` on its latents;
any other engine model alone at its profile's minimum shapes (optional inputs,
the UNet's ControlNet residuals, left out as the sampler sends them). One JSON
object goes to stdout and to --out. Memory comes from /proc, time from
perf_counter: measured here, on this CPU; no GPU figure.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from storymaker_serve.benchmarks import TEST_DATA
from storymaker_serve.benchmarks.processes import child_pids, command_line, rss_kib, tree_rss_kib
from storymaker_serve.runtime.cli import argument_parser
from storymaker_serve.runtime.manifest import Manifest
from storymaker_serve.runtime.serving.launcher import TritonServer


def tree_rss_gib(pid: int) -> float:
    """RSS of process `pid` and all below it (the reaper, tritonserver and its stubs), GiB."""
    return round(tree_rss_kib(pid) / 2**20, 2)


def stub_rss_gib(pid: int, part: str = "all") -> dict[str, float]:
    """RSS of each Python-backend stub under tritonserver `pid`, by the model folder in its command line; `part`
    "anon" for the stub's own memory only (processes.rss_kib)."""
    out = {}
    for child in child_pids(pid):
        cmd = command_line(child)
        if not cmd:
            continue
        name = next((arg.split("/")[-3] for arg in cmd if arg.endswith("/1/model.py")), " ".join(cmd)[:40])
        out[name] = round(out.get(name, 0.0) + rss_kib(child, part) / 2**20, 2)
    return out


def _infer(c, model, feeds: dict, outputs: list[str]):
    ins = []
    for k, v in feeds.items():
        dt = {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32", np.object_: "BYTES",
              np.bool_: "BOOL"}[v.dtype.type]
        i = grpcclient.InferInput(k, list(v.shape), dt)
        i.set_data_from_numpy(v)
        ins.append(i)
    t = time.perf_counter()
    r = c.infer(model, ins, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs], client_timeout=3600)
    return {o: r.as_numpy(o) for o in outputs}, round(time.perf_counter() - t, 2)


def main(argv=None) -> None:
    ap = argument_parser("python -m benchmarks.full_size_serve", __doc__)
    ap.add_argument("--build", type=Path, required=True, help="a full-size build folder (manifest.json, triton_repo/)")
    ap.add_argument("--models", default="unet", help="comma-separated engine models to serve")
    ap.add_argument("--size", type=int, default=768, help="sampler: image side in pixels (inside the build's profile)")
    ap.add_argument("--steps", type=int, default=2, help="sampler: UniPC steps")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--save", type=Path, help="with storymaker: write the frame's PNG here")
    a = ap.parse_args(argv)
    man = Manifest(a.build)
    names = a.models.split(",")
    if "text_encoder" in names:         # the engine models that it (and the frame models) call
        names += [n for n in ("text_encoder_1", "text_encoder_2") if n not in names]
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            (Path(tmp) / n).symlink_to((a.build / "triton_repo" / n).resolve())
        srv = TritonServer(tmp, required_models=names)
        t0 = time.perf_counter()
        srv.start(timeout=1800)
        report = {"build": str(a.build), "models": names, "cold_start_s": round(time.perf_counter() - t0, 1),
                  "server_rss_ready_gib": tree_rss_gib(srv.proc.pid),
                  "model_rss_ready_gib": stub_rss_gib(srv.server_pid),
                  "model_anon_ready_gib": stub_rss_gib(srv.server_pid, "anon"),
                  "requests": {}}
        try:
            c = grpcclient.InferenceServerClient(srv.url, channel_args=[("grpc.max_receive_message_length", -1)])
            rng = np.random.default_rng(0)
            done = set()
            data = TEST_DATA
            if "storymaker" in names:              # one whole frame: characters, text, loop, VAE, PNG
                frame = {"PROMPT": np.array([b"a man reading a book in a library"], dtype=object),
                         "PHOTOS": np.array([(data / "ldh.png").read_bytes()], dtype=object),
                         "MASKS": np.array([(data / "ldh_mask.png").read_bytes()], dtype=object),
                         "WIDTH": np.array([a.size], np.int32), "HEIGHT": np.array([a.size], np.int32),
                         "STEPS": np.array([a.steps], np.int32), "SEED": np.array([1], np.int64)}
                out, secs = _infer(c, "storymaker", frame, ["IMAGE", "PNG"])
                report["requests"]["storymaker"] = {"size": a.size, "steps": a.steps, "seconds": secs,
                                                    "image": list(out["IMAGE"].shape), "png_bytes": len(out["PNG"][0])}
                if a.save:
                    a.save.write_bytes(out["PNG"][0])
                done |= {"storymaker", "encode_characters", "text_encoder_1", "text_encoder_2", "clip_vision", "ppr",
                         "unet", "vae_decoder"}
            if "encode_characters" in names and "encode_characters" not in done:
                enc = {"PHOTOS": np.array([(data / "ldh.png").read_bytes()], dtype=object),
                       "MASKS": np.array([(data / "ldh_mask.png").read_bytes()], dtype=object)}
                out, secs = _infer(c, "encode_characters", enc, ["IMAGE_TOKENS", "NEG_IMAGE_TOKENS"])
                report["requests"]["encode_characters"] = {"seconds": secs, "tokens": list(out["IMAGE_TOKENS"].shape),
                                                           "finite": bool(np.isfinite(out["IMAGE_TOKENS"]).all())}
                done |= {"encode_characters", "clip_vision", "ppr"}
            if "text_encoder" in names and "text_encoder" not in done:
                out, secs = _infer(c, "text_encoder",
                                   {"PROMPT": np.array([b"a man reading a book in a library"], dtype=object)},
                                   ["PROMPT_EMBEDS", "POOLED"])
                report["requests"]["text_encoder"] = {"seconds": secs, "embeds": list(out["PROMPT_EMBEDS"].shape),
                                                      "finite": bool(np.isfinite(out["PROMPT_EMBEDS"]).all())}
                # the served path (tokenisers in the BLS model, the text_encoder_1/_2 engine models) against the same
                # sessions in this process
                from storymaker_serve.runtime.serving.engines import Build
                from storymaker_serve.runtime.serving.logic import TextEncoding

                ref, _ = TextEncoding(Build(a.build))("a man reading a book in a library", None)
                report["requests"]["text_encoder"]["max_abs_vs_in_process"] = float(max(
                    np.abs(out["PROMPT_EMBEDS"] - ref.prompt_embeds.numpy()).max(),
                    np.abs(out["POOLED"] - ref.pooled.numpy()).max()))
                done.add("text_encoder")
            if "sampler" in names:
                d, L, P = man.cross_attention_dim, man.text_len, man.pooled_dim
                f32 = lambda *shape: (rng.standard_normal(shape) * 0.5).astype(np.float32)
                feeds = {"PROMPT_EMBEDS": f32(2, L, d), "POOLED": f32(2, P), "IMAGE_TOKENS": f32(1, 40, d),
                         "NEG_IMAGE_TOKENS": f32(1, 40, d), "WIDTH": np.array([a.size], np.int32),
                         "HEIGHT": np.array([a.size], np.int32), "STEPS": np.array([a.steps], np.int32),
                         "SEED": np.array([1], np.int64)}
                out, secs = _infer(c, "sampler", feeds, ["LATENTS"])
                lat = out["LATENTS"]
                report["requests"]["sampler"] = {"size": a.size, "steps": a.steps, "seconds": secs,
                                                 "seconds_per_step": round(secs / a.steps, 2),
                                                 "latents": list(lat.shape),
                                                 "finite": bool(np.isfinite(lat).all())}
                done |= {"sampler", "unet"}
                if "vae_decoder" in names:
                    out, secs = _infer(c, "vae_decoder", {"latent": lat.astype(np.float32)}, ["image"])
                    report["requests"]["vae_decoder"] = {"seconds": secs, "image": list(out["image"].shape),
                                                         "finite": bool(np.isfinite(out["image"]).all())}
                    done.add("vae_decoder")
            for n in names:
                if n in done or not man.has(n):
                    continue
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
            report["model_rss_after_gib"] = stub_rss_gib(srv.server_pid)
            report["model_anon_after_gib"] = stub_rss_gib(srv.server_pid, "anon")
            report["host_available_gib_after"] = round(int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1]
                                                           .split()[0]) / 2**20, 2)
        finally:
            srv.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
