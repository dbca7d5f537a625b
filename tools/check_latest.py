"""`make check-latest`: would a user installing today, without the lock, get a working toolchain?

Installs this checkout with the newest versions pyproject.toml's ranges allow into a throwaway venv (torch stays
at the lock's build: users install torch for their own platform first), then runs a smoke test as a user would,
from a folder outside the checkout: `storymaker-build --demo` and the demo story over a real tritonserver with
`storymaker-client --serve`. Prints the packages whose versions differ from requirements/lock.txt and, when a step
fails, the installed distributions its traceback passes through: the likely culprits, with both versions.
Exit 0 when the smoke test passes with the newest versions, 1 when it does not.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
STORY = ROOT / "storymaker_serve" / "examples" / "demo_story.yaml"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """{distribution: version} of a uv/pip-compile lock file."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", lock.read_text(), re.M)
    return {canonical(n): v for n, v in pins}


def installed_versions(py: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout
    return {canonical(n): v for n, v in json.loads(out).items()}


def differences(locked: dict[str, str], now: dict[str, str]) -> list[str]:
    """'name lock -> now' lines for every installed distribution whose version moved or that the lock lacks
    (the lock's test tools, which this check does not install, are left out)."""
    lines = []
    for name in sorted(now):
        if name in ("storymaker-serve", "pip") or locked.get(name) == now[name]:
            continue
        lines.append(f"{name}: {locked.get(name, '(not in lock)')} -> {now.get(name, '(not installed)')}")
    return lines


def culprits(output: str, py: Path) -> list[str]:
    """Installed distributions whose files a traceback in `output` passes through (innermost last)."""
    tops = []
    for m in re.finditer(r'File "[^"]*/site-packages/([^/"]+)', output):
        top = m.group(1).removesuffix(".py")
        if top not in tops:
            tops.append(top)
    if not tops:
        return []
    code = "import importlib.metadata as m, json; print(json.dumps(m.packages_distributions()))"
    owners = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)
    return [canonical(d) for top in tops for d in owners.get(top, [top])]


def run(step: str, cmd: list[str], cwd: Path, log: list[tuple[str, int, str]], timeout: int = 1200) -> bool:
    t0 = time.time()
    print(f"check-latest: {step} ...", flush=True)
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""})
    out = r.stdout + r.stderr
    print(f"check-latest: {step}: {'ok' if r.returncode == 0 else f'FAILED (exit {r.returncode})'} "
          f"in {time.time() - t0:.0f} s", flush=True)
    log.append((step, r.returncode, out))
    return r.returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make check-latest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the venv (default: %(default)s)")
    a = ap.parse_args(argv)
    work = a.keep or Path(tempfile.mkdtemp(prefix="check-latest-"))
    work.mkdir(parents=True, exist_ok=True)
    venv, log = work / "venv", []
    py, bin_ = venv / "bin" / "python", venv / "bin"
    locked = locked_versions()
    torch = f"torch=={locked['torch']}"
    (work / "torch.txt").write_text(torch + "\n")
    ok = (run("create venv", [a.python, "-m", "venv", str(venv)], work, log)
          and run(f"install {torch} (the lock's build)", [str(py), "-m", "pip", "install", "-q", torch], work, log)
          and run("install the newest versions the ranges allow",
                  [str(py), "-m", "pip", "install", "-q", "-c", str(work / "torch.txt"),
                   f"{ROOT}[cpu,serve,kernel]"], work, log))
    if py.exists():
        moved = differences(locked, installed_versions(py))
        print(f"check-latest: {len(moved)} package(s) differ from requirements/lock.txt:")
        for line in moved:
            print(f"  {line}")
    ok = ok and run("environment check", [str(py), "-m", "storymaker_serve.envcheck"], work, log)
    ok = ok and run("storymaker-build --demo", [str(bin_ / "storymaker-build"), "--demo", "--out", "build"], work, log)
    ok = ok and run("storymaker-client (demo story, served)",
                    [str(bin_ / "storymaker-client"), str(STORY), "--serve", "build/triton_repo", "--out", "out",
                     "--steps", "2"], work, log)
    if ok:
        print("check-latest: ok: the newest versions build and serve the demo")
        return 0
    step, code, out = log[-1]
    print(f"check-latest: '{step}' failed (exit {code}); its last lines:\n{out[-3000:]}")
    blamed = culprits(out, py) if py.exists() else []
    if blamed:
        now = installed_versions(py)
        print("check-latest: the traceback passes through: " + ", ".join(
            f"{d} {locked.get(d, '(not in lock)')} -> {now.get(d, '?')}" for d in dict.fromkeys(blamed)))
    print(f"check-latest: work folder: {work}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
