"""Build manifest (`OUT/manifest.json`) and content-hash caching of build stages.

The manifest is the contract between `export/` and `runtime/`: per component
its files with sha256, opset, precision, inputs/outputs with dims, TensorRT
profile, parity record and export seconds; plus tool versions and the source
weights' hashes. A stage is skipped when its key (sha256 over the spec, the
hashes of the weight files it reads, precision, opset, tool versions and the
source of our exporter code) equals the key recorded for it and its files
still have the recorded sha256 ("cached by content, not by the file exists").
File hashes are memoised by (path, size, mtime) in `OUT/.hashcache.json` so a
rebuild does not re-read gigabytes of unchanged weights.
"""
from __future__ import annotations

import hashlib
import json
import platform
import resource
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("torch", "onnx", "onnxruntime", "onnxslim", "diffusers", "transformers", "insightface", "tensorrt")


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for t in TOOLS:
        try:
            out[t] = metadata.version(t)
        except metadata.PackageNotFoundError:
            out[t] = "not installed"
    return out


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    """Peak resident memory of this process since the last reset_peak_rss (VmHWM), in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def code_hash() -> str:
    """Our own exporter/runtime source: a change to it invalidates cached stages."""
    h = hashlib.sha256()
    for p in sorted([*ROOT.glob("export/*.py"), *ROOT.glob("runtime/*.py")]):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class Hasher:
    def __init__(self, cache_file: Path):
        self.file = cache_file
        self.memo: dict = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    def file_sha(self, p: Path) -> str:
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in self.memo:
            self.memo[key] = sha256_file(p)
        return self.memo[key]

    def tree(self, p: Path | None, label: str | None = None) -> dict[str, str]:
        """sha256 of every file under p (or of p itself, symlinks followed), keyed by `label`/relative path: the
        same weights in another folder, a folder of symlinks or a Hugging Face cache snapshot key the same."""
        if p is None:
            return {}
        label = label or p.name
        if p.is_file():
            return {label: self.file_sha(p)}
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {f"{label}/{f.relative_to(p).as_posix()}": self.file_sha(f) for f in files}

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.memo))


def stage_key(spec_json: dict, sources: dict[str, str], **settings) -> str:
    blob = json.dumps({"spec": spec_json, "sources": sources, "settings": settings, "tools": tool_versions(),
                       "code": code_hash()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached(record: dict | None, key: str, out: Path, hasher: Hasher) -> bool:
    if not record or record.get("key") != key:
        return False
    for f in record.get("files", []) + record.get("fp32_files", []):
        p = out / f["path"]
        if not p.exists() or hasher.file_sha(p) != f["sha256"]:
            return False
    return True


def model_file(record: dict) -> str:
    """The model file of a component record being written (its `files` list: the model, then external data);
    readers use runtime.manifest.Component.model_file."""
    (first, *_) = record["files"]
    return first["path"]


def file_records(files: list[Path], out: Path, hasher: Hasher) -> list[dict]:
    return [{"path": str(f.relative_to(out)), "sha256": hasher.file_sha(f), "bytes": f.stat().st_size} for f in files]


def load(out: Path) -> dict:
    p = out / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def write(out: Path, manifest: dict) -> Path:
    p = out / "manifest.json"
    p.write_text(json.dumps(manifest, indent=2, default=str))
    return p
