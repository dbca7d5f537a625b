"""Write the deployable Triton model repository `OUT/triton_repo/` for a build.

Engine models (clip_vision, ppr, unet, controlnet, vae_decoder) get configs
derived from their manifest spec (export/triton_config.py: Triton's own
protobuf, so unknown fields fail here) and the generic `triton_repo/engine`
glue; text_encoder, encode_characters, sampler and storymaker get their I/O
from `BLS_IO` below and their own glue from `triton_repo/`. Ops defaults:
dynamic batching with a bounded queue and timeouts on unet/controlnet, zero-data
warmup of the unet at its optimal shape, CPU instance groups, and per-model
`EXECUTION_ENV_PATH` pointing the Python-backend stub at our virtualenv.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from export.spec import ComponentSpec, TensorSpec
from export.triton_config import DTYPES, model_config, to_pbtxt

ROOT = Path(__file__).resolve().parents[1]
ENGINE_MODELS = ("clip_vision", "ppr", "unet", "controlnet", "vae_decoder")
BATCHED = {"unet": 8, "controlnet": 8}
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
    cfg = model_config(spec, backend="python", max_batch_size=BATCHED.get(name, 0))
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


def write_ngc_repo(build_dir: Path, venv: Path | None = None) -> Path:
    """`OUT/triton_repo_ngc`: the same repository with native backends for the engine models, for the NGC
    tritonserver container (which has them; the bundled wheel server has only the Python backend).
    Engine models use `tensorrt_plan` where the build made an engine, else `onnxruntime`, with the model
    file linked from the build; the BLS models stay Python. WRITTEN, NOT RUN here."""
    import json

    src = write_repo(build_dir, venv)
    out = build_dir / "triton_repo_ngc"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out, symlinks=True)
    m = json.loads((build_dir / "manifest.json").read_text())
    engines = m.get("engines", {}).get("engines", {})
    for name in ENGINE_MODELS:
        if name not in m["components"]:
            continue
        rec = m["components"][name]
        plan = engines.get(name)
        cfg = model_config(spec_from_record(rec), backend="tensorrt" if plan else "onnxruntime",
                           max_batch_size=BATCHED.get(name, 0), kind="KIND_GPU")
        if plan:
            cfg.platform, cfg.backend = "tensorrt_plan", ""
        if name in BATCHED:
            cfg.dynamic_batching.CopyFrom(_engine_config(name, rec).dynamic_batching)
        target = build_dir / (plan or rec["files"][0]["path"])
        shutil.rmtree(out / name / "1")
        (out / name / "1").mkdir(parents=True)
        (out / name / "1" / cfg.default_model_filename).symlink_to(target.resolve())
        for extra in rec["files"][1:]:                     # external weights next to the .onnx
            (out / name / "1" / Path(extra["path"]).name).symlink_to((build_dir / extra["path"]).resolve())
        (out / name / "config.pbtxt").write_text(to_pbtxt(cfg))
    return out


def write_repo(build_dir: Path, venv: Path | None = None) -> Path:
    """Write build_dir/triton_repo from the build's manifest; returns its path."""
    import json

    m = json.loads((build_dir / "manifest.json").read_text())
    comps = m["components"]
    out = build_dir / "triton_repo"
    shutil.rmtree(out, ignore_errors=True)
    venv = Path(venv or Path(sys.prefix)).resolve()
    unet_spec = comps["unet"]["spec"]
    d = unet_spec["inputs"][2]["dims"][2]
    pooled = unet_spec["inputs"][3]["dims"][1]
    configs = {n: (_engine_config(n, comps[n]), "engine") for n in ENGINE_MODELS if n in comps}
    configs.update({n: (_io_config(n, i, o, k), n) for n, (i, o, k) in bls_io(d, pooled).items()})
    for name, (cfg, src) in configs.items():
        for k, v in (("EXECUTION_ENV_PATH", str(venv)), ("build_dir", str(build_dir.resolve())),
                     ("component", name), ("project_root", str(ROOT))):
            cfg.parameters[k].string_value = v
        (out / name / "1").mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(to_pbtxt(cfg))
        shutil.copyfile(ROOT / "triton_repo" / src / "1" / "model.py", out / name / "1" / "model.py")
    return out
