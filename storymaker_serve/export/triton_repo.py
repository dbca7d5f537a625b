"""Write the deployable Triton model repository `OUT/triton_repo/` for a build.

Engine models (clip_vision, ppr, text_encoder_1, text_encoder_2, unet, controlnet, vae_decoder) get configs
derived from their manifest spec (export/triton_config.py: Triton's own
protobuf, so unknown fields fail here) and the generic `triton_repo/engine`
glue; text_encoder, encode_characters, sampler and storymaker get their I/O
from their declaration (runtime/serving/contract.py) and their own glue from `triton_repo/`. Ops defaults:
dynamic batching with a bounded queue and timeouts on unet/controlnet, zero-data
warmup of the unet at its optimal shape, CPU instance groups, and per-model
`EXECUTION_ENV_PATH` pointing the Python-backend stub at our virtualenv (the bundled-server variant; the NGC
variant writes no host path, see write_ngc_repo).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from storymaker_serve.export.triton_config import DTYPES, model_config, to_pbtxt
from storymaker_serve.runtime.manifest import Component, Manifest
from storymaker_serve.runtime.serving.contract import INFLIGHT, LIMITS, MODELS, BLSModel

ROOT = Path(__file__).resolve().parents[1]
# engine model -> the build component it serves. The text encoders are engine models like the others (native
# onnxruntime/TensorRT in the NGC repository); the BLS model `text_encoder` tokenises and calls both.
ENGINE_MODELS = {"clip_vision": "clip_vision", "ppr": "ppr", "text_encoder_1": "text_encoder",
                 "text_encoder_2": "text_encoder_2", "unet": "unet", "controlnet": "controlnet",
                 "vae_decoder": "vae_decoder"}
BATCHED = ("unet", "controlnet")     # dynamically batched; max_batch_size = the engine profile's batch max
QUEUE = dict(max_queue_size=64, default_timeout_microseconds=120_000_000)


def _io_config(model: BLSModel, sizes: dict[str, int], deploy: dict | None = None) -> pb.ModelConfig:
    """A BLS model's config from its declaration (runtime/serving/contract.py) and the build's sizes."""
    cfg = pb.ModelConfig(name=model.name, backend="python", max_batch_size=0)
    typ = lambda t: getattr(pb, f"TYPE_{'STRING' if t == 'BYTES' else t}")
    for p in model.inputs:
        cfg.input.add(name=p.name, data_type=typ(p.dtype), dims=p.resolve(sizes), optional=p.optional)
    for p in model.outputs:
        cfg.output.add(name=p.name, data_type=typ(p.dtype), dims=p.resolve(sizes))
    cfg.instance_group.add(count=model.instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    if model.decoupled:                       # any number of responses per request, over a gRPC stream
        cfg.model_transaction_policy.decoupled = True
    for k, v in LIMITS.items():               # request budgets: edit them here, per model
        cfg.parameters[k].string_value = str(v)
    for k, v in (INFLIGHT.items() if model.inflight else ()):
        cfg.parameters[k].string_value = str(v)
    if model.name in ("storymaker", "storymaker_stream"):       # the frame models: where their engines run
        cfg.parameters["denoise_engines"].string_value = (deploy or {}).get("denoise_engines", "bls")
    return cfg


def _engine_config(name: str, comp: Component, deploy: dict | None = None) -> pb.ModelConfig:
    spec = comp.spec
    gpu = (deploy or {}).get("device") == "cuda"
    cfg = model_config(spec, backend="python", max_batch_size=spec.max_batch() if name in BATCHED else 0,
                       zero_default_optional=True,   # the engine glue feeds zeros for absent ControlNet residuals
                       instances=(deploy or {}).get("gpu_instances", 1) if gpu else 1,
                       kind="KIND_GPU" if gpu else "KIND_CPU")
    cfg.name = name                     # the model's name: text_encoder_1 serves the component text_encoder
    if name in BATCHED:
        db = cfg.dynamic_batching
        db.max_queue_delay_microseconds = 2000
        db.default_queue_policy.timeout_action = pb.ModelQueuePolicy.REJECT
        db.default_queue_policy.max_queue_size = QUEUE["max_queue_size"]
        db.default_queue_policy.default_timeout_microseconds = QUEUE["default_timeout_microseconds"]
        db.default_queue_policy.allow_timeout_override = True
    if name == "unet":                  # warm the session at its optimal shape before serving
        w = cfg.model_warmup.add(name="unet_opt", batch_size=2)
        opt = spec.assignment("opt")
        for t in spec.inputs:
            dims = list(t.shape(opt))[1:] or [1]
            w.inputs[t.name].CopyFrom(pb.ModelWarmup.Input(data_type=DTYPES[t.dtype], dims=dims, zero_data=True))
    return cfg


def _relative_link(link: Path, target: Path) -> None:
    link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))


ENV_FILE = "python_env.tar.gz"


def _place_file(src: Path, dst: Path, placed: list[Path]) -> Path:
    """`src` at `dst`: a hard link to a copy already placed (one copy on disk for every model), else a copy."""
    if placed:
        try:
            dst.hardlink_to(placed[0])
            return dst
        except OSError:                 # another filesystem: a copy
            pass
    shutil.copyfile(src, dst)
    return dst


def write_ngc_repo(build_dir: Path, python_env: Path | None = None) -> tuple[Path, dict]:
    """`OUT/triton_repo_ngc`: the same repository with native backends for the engine models, for the NGC
    tritonserver container (which has them; the bundled wheel server has only the Python backend).
    Engine models use `tensorrt_plan` where the build made an engine, else `onnxruntime` (the returned
    {model: {backend, why}} says which, and why where an engine failed or was skipped). Relocatable: model
    files are relative links into the build folder and the Python models find it as "../.." from their own
    folder, so the build folder can be moved or mounted anywhere as a whole; no host path is written. The
    Python-backend models run in the container's Python unless `python_env` (a conda-pack tarball with this
    project installed) is given: it is placed in every Python model's own folder (hard links to one copy) and
    named by `EXECUTION_ENV_PATH` as `$$TRITON_MODEL_DIRECTORY/python_env.tar.gz`. WRITTEN, NOT RUN here (the
    bundled server has no onnxruntime/tensorrt backend)."""
    m = Manifest(build_dir)
    out = build_dir / "triton_repo_ngc"
    shutil.rmtree(out, ignore_errors=True)
    env_param, env_copies = None, []
    if python_env is not None:
        if not Path(python_env).is_file():
            raise FileNotFoundError(f"--ngc-python-env {python_env}: no such file (make it with conda-pack)")
        env_param = "$$TRITON_MODEL_DIRECTORY/" + ENV_FILE     # inside the model's own folder, as python_backend
        out.mkdir(parents=True)                                # documents it (a path outside it is undefined)
    backends = {}
    for name, (cfg, src) in _python_configs(m).items():
        native = name in ENGINE_MODELS
        if native:
            rec = m.component(ENGINE_MODELS[name])
            eng = rec.engine
            plan = eng.get("path") if eng.get("status") == "built" else None
            spec = rec.spec
            batch = spec.max_batch() if name in BATCHED else 0
            cfg = model_config(spec, backend="tensorrt" if plan else "onnxruntime", max_batch_size=batch,
                               kind="KIND_GPU",
                               instances=m.deployment["gpu_instances"])
            cfg.name = name
            if plan:
                cfg.platform, cfg.backend = "tensorrt_plan", ""
            if name in BATCHED:
                cfg.dynamic_batching.CopyFrom(_engine_config(name, rec).dynamic_batching)
            why = "" if plan else (f"engine {eng['status']}: {eng.get('error') or eng.get('reason', '')}"[:200]
                                   if eng else "no engine record")
            backends[name] = {"backend": "tensorrt_plan" if plan else "onnxruntime", "why": why}
        else:
            cfg.parameters["build_dir"].string_value = "../.."
            cfg.parameters["component"].string_value = ENGINE_MODELS.get(name, name)
            cfg.parameters["send_zero_residuals"].string_value = "true"   # native engines need every input
            if env_param:
                cfg.parameters["EXECUTION_ENV_PATH"].string_value = env_param
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(to_pbtxt(cfg))
        if not native:
            shutil.copyfile(ROOT / "triton_repo" / f"{src}.py", out / name / "1" / "model.py")
            if env_param:
                env_copies.append(_place_file(Path(python_env), out / name / ENV_FILE, env_copies))
            continue
        target = build_dir / (plan or rec.model_file)
        _relative_link(out / name / "1" / cfg.default_model_filename, target)
        if not plan:
            for extra in rec.data_files:                   # external weights next to the .onnx
                _relative_link(out / name / "1" / Path(extra.path).name, build_dir / extra.path)
    return out, backends


def _python_configs(m: Manifest) -> dict[str, tuple[pb.ModelConfig, str]]:
    """Every model of the repository as a Python-backend config: (config, glue folder in triton_repo/)."""
    configs = {n: (_engine_config(n, m.component(c), m.deployment), "engine") for n, c in ENGINE_MODELS.items()
               if m.has(c)}
    sizes = {"D": m.cross_attention_dim, "P": m.pooled_dim, "L": m.text_len, "C": m.latent_channels}
    configs.update({n: (_io_config(model, sizes, m.deployment), n) for n, model in MODELS.items()})
    return configs


def write_repo(build_dir: Path, venv: Path | None = None) -> Path:
    """Write build_dir/triton_repo (every model on the Python backend, for this host's venv); returns its path."""
    m = Manifest(build_dir)
    out = build_dir / "triton_repo"
    shutil.rmtree(out, ignore_errors=True)
    venv = Path(venv or Path(sys.prefix)).resolve()
    for name, (cfg, src) in _python_configs(m).items():
        for k, v in (("EXECUTION_ENV_PATH", str(venv)), ("build_dir", str(build_dir.resolve())),
                     ("component", ENGINE_MODELS.get(name, name))):
            cfg.parameters[k].string_value = v
        (out / name / "1").mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(to_pbtxt(cfg))
        shutil.copyfile(ROOT / "triton_repo" / f"{src}.py", out / name / "1" / "model.py")
    return out
