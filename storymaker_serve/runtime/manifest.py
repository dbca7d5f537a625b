"""The build manifest, typed: the contract export writes (export/manifest.py) and runtime reads.

`Manifest.load(build_dir)` gives `Component` records whose `spec` is a `ComponentSpec` (runtime/spec.py), so
readers name tensors and symbols (`unet.spec.input("text_embeds")`, `unet.spec.range("h").max`) instead of
indexing JSON lists by position. Facts every reader needs are derived here once, from the specs that export
derived from the models: the VAE's scale factor, the text length, the widths of the image tokens and pooled
text embedding, the latent channels, the character limit and the image sizes the engines accept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from storymaker_serve.runtime.errors import WeightsError
from storymaker_serve.runtime.shapes import eval_dim
from storymaker_serve.runtime.spec import ComponentSpec


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Component:
    name: str
    spec: ComponentSpec
    files: tuple[FileRecord, ...]
    precision: str
    profile: dict
    engine: dict                     # TensorRT engine record (status, path, tensorrt, ...), {} when none
    raw: dict                        # the JSON record, for fields only tools read (parity, timings)

    @classmethod
    def from_json(cls, name: str, rec: dict) -> Component:
        return cls(name, ComponentSpec.from_json(rec["spec"]), tuple(FileRecord(**f) for f in rec["files"]),
                   rec["precision"], rec["profile"], rec.get("engine") or {}, rec)

    @property
    def model_file(self) -> str:
        """The model itself (`.onnx`); further files are its external data."""
        return self.files[0].path

    @property
    def data_files(self) -> tuple[FileRecord, ...]:
        return self.files[1:]

    @property
    def fp32_files(self) -> tuple[FileRecord, ...]:
        """The fp32 export of an fp16 component (checked too: `parity_fp32_export`); the files themselves otherwise."""
        return tuple(FileRecord(**f) for f in self.raw.get("fp32_files") or []) or self.files

    def files_for(self, providers) -> tuple[FileRecord, ...]:
        """What a session with these onnxruntime providers should load: CPU-only sessions take the fp32 export
        (onnxruntime's CPU kernels compute these graphs in fp32 anyway: an fp16 file gains nothing and costs a
        resident fp32 copy of every weight, measured 12.3 GiB vs 1.5 GiB for the full-size UNet at load)."""
        return self.fp32_files if set(providers) <= {"cpu"} else self.files

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.spec.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.spec.outputs]


class Manifest:
    """A build folder's `manifest.json`, typed."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise WeightsError(f"{mf}: missing. Run `python -m export.build --out {self.path}` first.")
        self.data = json.loads(mf.read_text())
        self.components = {n: Component.from_json(n, r) for n, r in self.data["components"].items()}
        self.assets: dict[str, str] = self.data.get("assets", {})

    def component(self, name: str) -> Component:
        c = self.components.get(name)
        if c is None:
            raise WeightsError(f"{self.path}: the build has no '{name}' component; rebuild including it")
        return c

    def has(self, name: str) -> bool:
        return name in self.components

    def file(self, rel: str) -> Path:
        return self.path / rel

    @property
    def deployment(self) -> dict:
        """Where the engines run (`export.build --device/--providers/--gpu-instances`); CPU by default."""
        d = self.data.get("deployment") or {}
        out = {"device": d.get("device", "cpu"), "providers": list(d.get("providers", ["cpu"])),
               "gpu_instances": int(d.get("gpu_instances", 1)), "denoise_engines": d.get("denoise_engines", "bls")}
        if d.get("engine_factory"):          # `module:name` building each component's engine (benchmarks' stand-ins)
            out["engine_factory"] = d["engine_factory"]
        return out

    @property
    def sampling_defaults(self) -> dict:
        """GenerateOptions fields this build serves by default (`export.build --lora` with a few-step LoRA, or
        --default-scheduler ...): a request's own values win."""
        return dict(self.data.get("sampling_defaults") or {})

    @property
    def scheduler_config(self) -> dict:
        return json.loads((self.path / self.assets["scheduler_config"]).read_text())

    # ---- facts derived from the specs ----
    @property
    def vae_factor(self) -> int:
        """Pixels per latent: the vae_decoder's output width for a latent width of 1."""
        return eval_dim(self.component("vae_decoder").spec.output("image").dims[-1], {"w": 1})

    @property
    def text_len(self) -> int:
        return self.component("text_encoder").spec.input("input_ids").dims[-1]

    @property
    def cross_attention_dim(self) -> int:
        return self.component("unet").spec.input("encoder_hidden_states").dims[-1]

    @property
    def pooled_dim(self) -> int:
        return self.component("unet").spec.input("text_embeds").dims[-1]

    @property
    def latent_channels(self) -> int:
        return self.component("unet").spec.input("sample").dims[1]

    @property
    def max_characters(self) -> int:
        return self.component("ppr").spec.range("n").max

    @property
    def size_range(self) -> tuple[int, int, int]:
        """(min, opt, max) image side in pixels the UNet engine accepts (both axes share the range)."""
        h = self.component("unet").spec.range("h")
        return h.min * self.vae_factor, h.opt * self.vae_factor, h.max * self.vae_factor
