"""One package, no shadowing, one ONNX Runtime: what a fresh install depends on (storymaker_serve.envcheck)."""
import importlib.metadata as metadata
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import storymaker_serve
from storymaker_serve import envcheck

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_has_one_importable_package():
    """The top-level folders of the checkout other than storymaker_serve hold entry modules only: no
    __init__.py, so none is a regular package that could shadow a distribution's."""
    regular = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert regular == ["storymaker_serve"], regular


def test_no_name_of_ours_is_provided_by_another_distribution():
    assert envcheck.shadowed_names() == []
    provided = metadata.packages_distributions()
    assert "storymaker-serve" in provided["storymaker_serve"]


def test_shadowing_is_reported(monkeypatch):
    monkeypatch.setattr(metadata, "packages_distributions",
                        lambda: {"storymaker_serve": ["storymaker-serve", "other-dist"]})
    assert envcheck.shadowed_names() == ["storymaker_serve (also provided by other-dist)"]


def test_pypi_kernels_is_importable_from_the_checkout_root():
    """`python -m export.build` puts the checkout root first on sys.path; `kernels` must still be the PyPI
    package that transformers imports (it is in the lock), not a folder of ours."""
    pytest.importorskip("kernels")
    code = ("import kernels, json; from transformers.integrations import hub_kernels; "
            "print(json.dumps(kernels.__file__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "site-packages" in json.loads(out)


def test_every_file_loads_as_exactly_one_module():
    """Import every module of the package, then run a checkout entry point in the same process: no source file
    appears under two module names (runtime.errors vs storymaker_serve.runtime.errors broke `except`)."""
    skip = {"storymaker_serve.triton_repo."}                       # glue: imports triton_python_backend_utils
    names = [m.name for m in pkgutil.walk_packages(storymaker_serve.__path__, "storymaker_serve.")
             if not any(m.name.startswith(s) for s in skip)]
    code = ("import importlib, json, runpy, sys\n"
            f"for n in {names!r}:\n"
            "    try: importlib.import_module(n)\n"
            "    except ImportError: pass\n"                         # optional dependencies (tensorrt, ...)
            "sys.argv = ['x', '--help']\n"
            "try: runpy.run_module('runtime.client', run_name='__main__', alter_sys=True)\n"
            "except SystemExit: pass\n"
            "files = [(getattr(m, '__file__', None), k) for k, m in list(sys.modules.items())]\n"
            "print(json.dumps([f for f in files if f[0]]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    by_file = {}
    for file, name in json.loads(out.splitlines()[-1]):
        by_file.setdefault(file, []).append(name)
    ours = (str(ROOT / "storymaker_serve"), str(ROOT / "export"), str(ROOT / "runtime"), str(ROOT / "benchmarks"))
    twice = {f: n for f, n in by_file.items() if len(n) > 1 and f.startswith(ours)}
    assert not twice, twice
    assert sum(f.startswith(ours) for f in by_file) > 50


def test_two_onnxruntime_distributions_are_refused(monkeypatch):
    versions = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}

    def version(name):
        if name in versions:
            return versions[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(envcheck, "ENTRY_MODULES", ())
    found = envcheck.problems()
    assert len(found) == 1 and "onnxruntime==1.32.0, onnxruntime-gpu==1.32.0" in found[0]
    assert "pip uninstall -y onnxruntime" in found[0]
    versions.clear()
    assert "no ONNX Runtime is installed" in envcheck.problems()[0]


def test_envcheck_passes_here(capsys):
    assert envcheck.main() == 0
    assert capsys.readouterr().out.startswith("envcheck: ok")


def test_lock_pins_every_package_with_hashes():
    """Every line of the lock is an exact pin with a hash; the CPU lock has the CPU torch and the CPU onnxruntime,
    the GPU lock only onnxruntime-gpu; neither has opencv-python beside the headless build."""
    for lock, ort, absent in (("lock.txt", "onnxruntime", "onnxruntime-gpu"),
                              ("lock-gpu.txt", "onnxruntime-gpu", "onnxruntime")):
        text = (ROOT / "requirements" / lock).read_text()
        reqs = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
        assert reqs and all("==" in r and r.endswith("\\") for r in reqs), lock
        names = {r.split("==")[0].lower() for r in reqs}
        assert ort in names and absent not in names and "opencv-python" not in names, lock
    assert "torch==2.13.0+cpu" in (ROOT / "requirements" / "lock.txt").read_text()


def _check_latest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_latest", ROOT / "tools" / "check_latest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_latest_names_what_moved_and_what_broke():
    """`make check-latest` reports versions that differ from the lock and the distributions a failure's traceback
    passes through (run in full by hand: it installs the newest versions)."""
    cl = _check_latest()
    locked = cl.locked_versions()
    assert locked["torch"] == "2.13.0+cpu" and "transformers" in locked and "pip" not in locked
    moved = cl.differences({"transformers": "5.24.0", "numpy": "1.26.4"},
                           {"transformers": "5.25.0", "numpy": "1.26.4", "kernels": "0.19.1"})
    assert moved == ["kernels: (not in lock) -> 0.19.1", "transformers: 5.24.0 -> 5.25.0"]
    site = Path(metadata.distribution("transformers").locate_file("")) / "transformers"
    trace = (f'Traceback (most recent call last):\n  File "{site}/integrations/hub_kernels.py", line 3, in <module>\n'
             "ImportError: cannot import name 'CUDAProperties' from 'kernels'")
    assert cl.culprits(trace, Path(sys.executable)) == ["transformers"]
