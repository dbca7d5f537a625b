"""Write the deployable Triton model repository `OUT/triton_repo/` for a build.

Engine models (clip_vision, ppr, unet, controlnet, vae_decoder) get configs
derived from their manifest spec (export/triton_config.py: Triton's own
protobuf, so unknown fields fail here) and the generic `triton_repo/engine`
glue; text_encoder, encode_characters, sampler and storymaker get their I/O
from `BLS_IO` below and their own glue from `triton_repo/`. Ops defaults:
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

from runtime.spec import ComponentSpec, TensorSpec
from export.triton_config import DTYPES, model_config, to_pbtxt

ROOT = Path(__file__).resolve().parents[1]
ENGINE_MODELS = ("clip_vision", "ppr", "unet", "controlnet", "vae_decoder")
BATCHED = ("unet", "controlnet")     # dynamically batched; max_batch_size = the engine profile's batch max
QUEUE = dict(max_queue_size=64, default_timeout_microseconds=120_000_000)
CHAR_IN = [("PHOTOS", "BYTES", [-1]), ("MASKS", "BYTES", [-1]), ("CLOTHS", "BYTES", [-1], True),
           ("FACE_INFO", "BYTES", [-1], True), ("MASK_CHANNELS", "INT32", [-1], True),
           ("IDENTITY_ONLY", "BOOL", [1], True), ("INTERPOLATION", "FP32", [1], True)]
SAMPLING_IN = [("SEED", "INT64", [1], True), ("STEPS", "INT32", [1], True), ("GUIDANCE", "FP32", [1], True),
               ("WIDTH", "INT32", [1], True), ("HEIGHT", "INT32", [1], True), ("IP_SCALE", "FP32", [1], True),
               ("POSE", "BYTES", [1], True), ("CONTROLNET_SCALE", "FP32", [1], True)]


def bls_io(d: int, pooled: int) -> dict:
    tok = [("IMAGE_TOKENS", "FP32", [1, -1, d]), ("NEG_IMAGE_TOKENS", "FP32", [1, -1, d])]
    return {
        "text_encoder": ([("PROMPT", "BYTES", [1]), ("NEGATIVE_PROMPT", "BYTES", [1], True)],
                         [("PROMPT_EMBEDS", "FP32", [2, 77, d]), ("POOLED", "FP32", [2, pooled]), ("TRUNCATED", "BOOL", [1])], 1),
        "encode_characters": (CHAR_IN, tok, 1),
        "sampler": ([("PROMPT_EMBEDS", "FP32", [2, 77, d]), ("POOLED", "FP32", [2, pooled]), *tok, *SAMPLING_IN],
                    [("LATENTS", "FP32", [1, 4, -1, -1])], 2),
        "storymaker": ([("PROMPT", "BYTES", [1]), ("NEGATIVE_PROMPT", "BYTES", [1], True),
                        *[(n, t, s, True) for n, t, s in tok], *CHAR_IN_OPTIONAL, *SAMPLING_IN],
                       [("IMAGE", "UINT8", [-1, -1, 3]), ("PNG", "BYTES", [1]), ("TRUNCATED", "BOOL", [1])], 2),
    }


CHAR_IN_OPTIONAL = [(n, t, s, True) for n, t, s, *_ in CHAR_IN]


def _io_config(name: str, inputs, outputs, instances: int) -> pb.ModelConfig:
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    for n, t, dims, *opt in inputs:
        cfg.input.add(name=n, data_type=getattr(pb, f"TYPE_{'STRING' if t == 'BYTES' else t}"), dims=dims,
                      optional=bool(opt and opt[0]))
    for n, t, dims in outputs:
        cfg.output.add(name=n, data_type=getattr(pb, f"TYPE_{'STRING' if t == 'BYTES' else t}"), dims=dims)
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    return cfg


def spec_from_record(rec: dict) -> ComponentSpec:
    s = rec["spec"]
    ts = lambda lst: tuple(TensorSpec(**{**t, "dims": tuple(t["dims"])}) for t in lst)
    return ComponentSpec(s["name"], ts(s["inputs"]), ts(s["outputs"]), {k: tuple(v) for k, v in s["symbols"].items()},
                         s["tolerance"], s["note"])


def _engine_config(name: str, rec: dict) -> pb.ModelConfig:
    spec = spec_from_record(rec)
    cfg = model_config(spec, backend="python", max_batch_size=spec.max_batch() if name in BATCHED else 0)
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


def write_ngc_repo(build_dir: Path, python_env: Path | None = None) -> tuple[Path, dict]:
    """`OUT/triton_repo_ngc`: the same repository with native backends for the engine models, for the NGC
    tritonserver container (which has them; the bundled wheel server has only the Python backend).
    Engine models use `tensorrt_plan` where the build made an engine, else `onnxruntime` (the returned
    {model: {backend, why}} says which, and why where an engine failed or was skipped). Relocatable: model
    files are relative links into the build folder and the Python models find it as "../.." from their own
    folder, so the build folder can be moved or mounted anywhere as a whole; no host path is written. The
    Python-backend models run in the container's Python unless `python_env` (a conda-pack tarball with this
    project installed) is given: it is copied into the repository and named by `EXECUTION_ENV_PATH` relative to
    `$$TRITON_MODEL_DIRECTORY`. WRITTEN, NOT RUN here (the bundled server has no onnxruntime/tensorrt backend)."""
    import json

    m = json.loads((build_dir / "manifest.json").read_text())
    out = build_dir / "triton_repo_ngc"
    shutil.rmtree(out, ignore_errors=True)
    env_param = None
    if python_env is not None:
        if not Path(python_env).is_file():
            raise FileNotFoundError(f"--ngc-python-env {python_env}: no such file (make it with conda-pack)")
        (out / "storymaker").mkdir(parents=True)
        shutil.copyfile(python_env, out / "storymaker" / "python_env.tar.gz")
        env_param = "$$TRITON_MODEL_DIRECTORY/../storymaker/python_env.tar.gz"
    backends = {}
    for name, (cfg, src) in _python_configs(m["components"]).items():
        native = name in ENGINE_MODELS
        if native:
            rec = m["components"][name]
            eng = rec.get("engine") or {}
            plan = eng.get("path") if eng.get("status") == "built" else None
            spec = spec_from_record(rec)
            batch = spec.max_batch() if name in BATCHED else 0
            cfg = model_config(spec, backend="tensorrt" if plan else "onnxruntime", max_batch_size=batch, kind="KIND_GPU")
            if plan:
                cfg.platform, cfg.backend = "tensorrt_plan", ""
            if name in BATCHED:
                cfg.dynamic_batching.CopyFrom(_engine_config(name, rec).dynamic_batching)
            why = "" if plan else (f"engine {eng['status']}: {eng.get('error') or eng.get('reason', '')}"[:200]
                                   if eng else "no engine record")
            backends[name] = {"backend": "tensorrt_plan" if plan else "onnxruntime", "why": why}
        else:
            cfg.parameters["build_dir"].string_value = "../.."
            cfg.parameters["component"].string_value = name
            if env_param:
                cfg.parameters["EXECUTION_ENV_PATH"].string_value = env_param
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(to_pbtxt(cfg))
        if not native:
            shutil.copyfile(ROOT / "triton_repo" / src / "1" / "model.py", out / name / "1" / "model.py")
            continue
        target = build_dir / (plan or rec["files"][0]["path"])
        _relative_link(out / name / "1" / cfg.default_model_filename, target)
        if not plan:
            for extra in rec["files"][1:]:                 # external weights next to the .onnx
                _relative_link(out / name / "1" / Path(extra["path"]).name, build_dir / extra["path"])
    return out, backends


def _python_configs(comps: dict) -> dict[str, tuple[pb.ModelConfig, str]]:
    """Every model of the repository as a Python-backend config: (config, glue folder in triton_repo/)."""
    unet_spec = spec_from_record(comps["unet"])
    d = next(t for t in unet_spec.inputs if t.name == "encoder_hidden_states").dims[-1]
    pooled = next(t for t in unet_spec.inputs if t.name == "text_embeds").dims[-1]
    configs = {n: (_engine_config(n, comps[n]), "engine") for n in ENGINE_MODELS if n in comps}
    configs.update({n: (_io_config(n, i, o, k), n) for n, (i, o, k) in bls_io(d, pooled).items()})
    return configs


def write_repo(build_dir: Path, venv: Path | None = None) -> Path:
    """Write build_dir/triton_repo (every model on the Python backend, for this host's venv); returns its path."""
    import json

    m = json.loads((build_dir / "manifest.json").read_text())
    out = build_dir / "triton_repo"
    shutil.rmtree(out, ignore_errors=True)
    venv = Path(venv or Path(sys.prefix)).resolve()
    for name, (cfg, src) in _python_configs(m["components"]).items():
        for k, v in (("EXECUTION_ENV_PATH", str(venv)), ("build_dir", str(build_dir.resolve())),
                     ("component", name), ("project_root", str(ROOT))):
            cfg.parameters[k].string_value = v
        (out / name / "1").mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(to_pbtxt(cfg))
        shutil.copyfile(ROOT / "triton_repo" / src / "1" / "model.py", out / name / "1" / "model.py")
    return out
