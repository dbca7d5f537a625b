"""`python -m storymaker_serve.envcheck`: is this Python environment one the toolchain can run in?

Checks, each with the fix in its message:
- every command's module imports (what `make` runs before it writes its install stamp);
- no importable name of ours equals a top-level name that an installed distribution provides (a folder of ours
  named like a package another distribution imports shadows it: transformers >= 5.25 imports `kernels`);
- at most one ONNX Runtime distribution (`onnxruntime` and `onnxruntime-gpu` write the same `onnxruntime`
  package; with both, the one installed last wins and CUDA can silently disappear).
Exit 0 and one line when all hold; exit 1 naming each problem otherwise.
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import sys

ENTRY_MODULES = ("storymaker_serve.export.build", "storymaker_serve.export.refit",
                 "storymaker_serve.runtime.generate", "storymaker_serve.runtime.serving.launcher",
                 "storymaker_serve.runtime.serving.client", "storymaker_serve.benchmarks.run")
OUR_NAMES = ("storymaker_serve",)
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")


def shadowed_names(ours=OUR_NAMES) -> list[str]:
    """Our import names that some other installed distribution also provides at top level."""
    provided = metadata.packages_distributions()
    return [f"{name} (also provided by {', '.join(d for d in provided[name] if d != 'storymaker-serve')})"
            for name in ours if set(provided.get(name, ())) - {"storymaker-serve"}]


def onnxruntime_distributions() -> list[str]:
    """The ONNX Runtime distributions installed in this environment."""
    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def problems() -> list[str]:
    out = []
    for module in ENTRY_MODULES:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - reported, with the module that failed
            out.append(f"`import {module}` fails: {type(e).__name__}: {e}. Install from the lock "
                       f"(requirements/lock.txt, see README) or run `make check-latest` to see which package broke")
    out += [f"import name {s} is shadowed; uninstall the other distribution" for s in shadowed_names()]
    ort = onnxruntime_distributions()
    if len(ort) > 1:
        out.append(f"several ONNX Runtime distributions are installed ({', '.join(ort)}); they share the import "
                   f"name `onnxruntime`. Keep one: `pip uninstall -y onnxruntime` on a GPU machine, "
                   f"`pip uninstall -y onnxruntime-gpu` on a CPU one")
    elif not ort:
        out.append("no ONNX Runtime is installed: install the `cpu` or the `gpu` extra (one of them)")
    return out


def main() -> int:
    found = problems()
    for p in found:
        print(f"envcheck: {p}", file=sys.stderr)
    if not found:
        print(f"envcheck: ok ({len(ENTRY_MODULES)} entry modules import; {onnxruntime_distributions()[0]})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
