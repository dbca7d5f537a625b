"""The tritonserver command for a build's NGC-container repository (BUILD/triton_repo_ngc): what
`python -m runtime.serve --ngc-command BUILD` prints."""
from __future__ import annotations

from pathlib import Path

from storymaker_serve.runtime.errors import DeploymentError
from storymaker_serve.runtime.gpu import gpu_identity, runs_on, tensorrt_version, trt_loads
from storymaker_serve.runtime.manifest import Manifest


def ngc_command(build_dir: Path, mount: str = "/models",
                container_tensorrt: str | None = None) -> tuple[list[str], list[str]]:
    """The tritonserver command for BUILD/triton_repo_ngc inside an NGC container where the build folder is
    mounted at `mount`, and notes on what the container must have. Reads the manifest's engine records: with
    version-compatible engines the TensorRT backend needs `--backend-config=tensorrt,version-compatible=true`;
    otherwise every engine loads only on the exact TensorRT version that built it. `container_tensorrt`
    (the container's TensorRT version; default: the TensorRT installed where this runs, if any) and the GPU here (if
    any) are checked against the engines: a mismatch raises with the fix."""
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
        container_tensorrt = container_tensorrt or tensorrt_version()
        gpu = gpu_identity()
        if gpu:
            wrong = {n: e.get("compute_capability") for n, e in built.items()
                     if not runs_on(e, gpu["compute_capability"])}
            if wrong:
                raise DeploymentError(f"the engines of {sorted(wrong)} were built for compute capability "
                                      f"{sorted(set(wrong.values()))} but this GPU ({gpu['gpu']}) is "
                                      f"{gpu['compute_capability']}: rebuild them on this GPU (`python -m export.build "
                                      "... --engines auto`) or build with --trt-hardware-compat ampere+")
            notes.append(f"engines checked against this GPU: {gpu['gpu']}, compute capability "
                         f"{gpu['compute_capability']}")
        if container_tensorrt:
            bad = [n for n, e in built.items() if not trt_loads(e, container_tensorrt)]
            if bad:
                raise DeploymentError(f"TensorRT {container_tensorrt} cannot load the engines of {bad} (built with "
                                      f"{versions}{', version-compatible' if compat else ''}); rebuild them with that "
                                      "TensorRT (`python -m export.build ... --engines auto`) or pick the matching "
                                      "container")
    notes.append("Python-backend models (text_encoder, encode_characters, sampler, storymaker) need this project and "
                 "its requirements in the container's Python, or a conda-pack'ed environment given to the build with "
                 "--ngc-python-env; they find the build folder as ../.. from their model folder, so mount the whole "
                 "build folder")
    return cmd, notes
