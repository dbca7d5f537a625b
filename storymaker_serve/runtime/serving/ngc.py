"""The tritonserver command for a build's NGC-container repository (BUILD/triton_repo_ngc): what
`python -m runtime.serve --ngc-command BUILD` prints."""
from __future__ import annotations

from pathlib import Path

from storymaker_serve.runtime.errors import StoryMakerError
from storymaker_serve.runtime.manifest import Manifest


def ngc_command(build_dir: Path, mount: str = "/models",
                container_tensorrt: str | None = None) -> tuple[list[str], list[str]]:
    """The tritonserver command for BUILD/triton_repo_ngc inside an NGC container where the build folder is
    mounted at `mount`, and notes on what the container must have. Reads the manifest's engine records: with
    version-compatible engines the TensorRT backend needs `--backend-config=tensorrt,version-compatible=true`;
    otherwise every engine loads only on the exact TensorRT version that built it. `container_tensorrt`
    (the container's TensorRT version) is checked against the engines: a mismatch raises with the fix."""
    m = Manifest(build_dir)
    built = {n: c.engine for n, c in m.components.items() if c.engine.get("status") == "built"}
    cmd = ["tritonserver", f"--model-repository={mount.rstrip('/')}/triton_repo_ngc", "--model-control-mode=none",
           "--strict-readiness=true"]
    notes = []
    if built:
        versions = sorted({e["tensorrt"] for e in built.values()})
        compat = all(e["version_compatible"] for e in built.values())
        if compat:
            cmd.append("--backend-config=tensorrt,version-compatible=true")
            notes.append(f"TensorRT engines ({', '.join(built)}) are version-compatible, built with TensorRT "
                         f"{', '.join(versions)}: they load on that version and later ones of the same major")
        else:
            notes.append(f"TensorRT engines ({', '.join(built)}) load only on TensorRT {', '.join(versions)} exactly: "
                         "use the NGC tritonserver release that ships it, or rebuild with --trt-version-compatible")
        if container_tensorrt:
            bad = [n for n, e in built.items() if not _trt_loads(e, container_tensorrt)]
            if bad:
                raise StoryMakerError(f"TensorRT {container_tensorrt} cannot load the engines of {bad} (built with "
                                      f"{versions}{', version-compatible' if compat else ''}); rebuild them with that "
                                      "TensorRT (`python -m export.build ... --engines auto`) or pick the matching "
                                      "container")
    notes.append("Python-backend models (text_encoder, encode_characters, sampler, storymaker) need this project and "
                 "its requirements in the container's Python, or a conda-pack'ed environment given to the build with "
                 "--ngc-python-env; they find the build folder as ../.. from their model folder, so mount the whole "
                 "build folder")
    return cmd, notes


def _trt_loads(engine: dict, runtime_version: str) -> bool:
    """Does a TensorRT `runtime_version` load this engine record? Exact version, or with a version-compatible
    engine any later version of the same major (TensorRT's documented rule)."""
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:3] if x.isdigit())
    built, run = as_tuple(engine["tensorrt"]), as_tuple(runtime_version)
    if not engine.get("version_compatible"):
        return built == run
    return run[:1] == built[:1] and run >= built
