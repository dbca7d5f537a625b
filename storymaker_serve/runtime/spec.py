"""One I/O spec per exported component: the single source of tensor names, dtypes and dims.

The spec types live in runtime (export writes them into the manifest with `to_json`, runtime reads them back
with `from_json` through runtime/manifest.py), so both sides share one definition.

A `ComponentSpec` lists its inputs and outputs as `TensorSpec`s whose dims are
ints or symbolic expressions over named symbols (`"B"`, `"2*B"`, `"h"`,
`"h/2"`, `"T_img"`), plus each symbol's (min, opt, max) range. Everything
else derives from it (TensorRT demo/Diffusion's contract, STYLE.md): ONNX
`dynamic_axes`, TensorRT min/opt/max profile shapes, Triton `dims` (-1 for a
dynamic axis), seeded sample inputs, and the shape assignments that parity
validation tries (every symbol at >= 2 values).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from storymaker_serve.runtime.shapes import dim_name, eval_dim  # noqa: F401  (re-exported)

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                       # float32 | float16 | int64 | int32
    dims: tuple[int | str, ...]
    low: float = -1.0                # sample-input value range (uniform); ints: [low, high)
    high: float = 1.0
    zero_default: bool = False       # may be left out: the runner feeds zeros (the UNet's ControlNet residuals)

    def shape(self, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, values) for d in self.dims)


class Range(NamedTuple):
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    symbols: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # sym -> (min, opt, max)
    tolerance: float = 1e-4          # fp32 max abs error vs the PyTorch reference
    note: str = ""

    # ---- lookups by name (never by position) ----
    def input(self, name: str) -> TensorSpec:
        return self._find(self.inputs, name, "input")

    def output(self, name: str) -> TensorSpec:
        return self._find(self.outputs, name, "output")

    def _find(self, tensors, name, kind) -> TensorSpec:
        for t in tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no {kind} {name!r} (it has {[t.name for t in tensors]})")

    def bind(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """Symbol values read off the shapes of the given inputs (plain-symbol axes, e.g. N, h, w, S)."""
        values: dict[str, int] = {}
        for t in self.inputs:
            for d, n in zip(t.dims, shapes.get(t.name, ())):
                if isinstance(d, str) and d in self.symbols:
                    values.setdefault(d, int(n))
        return values

    def zeros(self, tensors, values: dict[str, int], cache: dict, alloc=None) -> dict:
        """float32 zeros for `tensors` at the symbol `values`, each allocated once per (name, shape) in `cache`:
        numpy arrays, or what `alloc(shape)` makes (torch zeros on a device)."""
        out = {}
        for t in tensors:
            key = (t.name, t.shape(values))
            if key not in cache:
                cache[key] = np.zeros(key[1], np.float32) if alloc is None else alloc(key[1])
            out[t.name] = cache[key]
        return out

    def range(self, symbol: str) -> Range:
        return Range(*self.symbols[symbol])

    # ---- derived views (never written by hand elsewhere) ----
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in self.inputs + self.outputs:
            dyn = {i: dim_name(d) for i, d in enumerate(t.dims) if isinstance(d, str)}
            if dyn:
                axes[t.name] = dyn
        return axes

    def assignment(self, which: str) -> dict[str, int]:
        idx = {"min": 0, "opt": 1, "max": 2}[which]
        return {s: r[idx] for s, r in self.symbols.items()}

    def profile(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """TensorRT optimisation profile: input -> {min, opt, max} shapes."""
        return {t.name: {w: t.shape(self.assignment(w)) for w in ("min", "opt", "max")} for t in self.inputs}

    def max_batch(self) -> int:
        """Largest batch the engine accepts: the profile's max of the batch axis (axis 0, the same symbol on
        every input). Triton's `max_batch_size` and TensorRT's profile both come from here, so a config can
        never promise more rows than the engine was built for (Triton's TensorRT backend refuses that)."""
        firsts = {t.dims[0] for t in self.inputs}
        if len(firsts) != 1 or not isinstance(next(iter(firsts)), str):
            raise ValueError(f"{self.name}: inputs do not share one symbolic batch axis ({sorted(map(str, firsts))})")
        prof = self.profile()
        return min(p["max"][0] for p in prof.values())

    def triton_dims(self, tensor: TensorSpec, batch_dim: bool = False) -> list[int]:
        dims = [d if isinstance(d, int) else -1 for d in tensor.dims]
        return dims[1:] if batch_dim else dims

    def parity_assignments(self) -> list[dict[str, int]]:
        """min, opt and max of every symbol (each dynamic axis at >= 2 values), plus a mixed one
        (symbols alternately at min and max, e.g. a non-square latent) when there are several symbols."""
        seen, out = set(), []
        mixed = {s: r[0] if i % 2 else r[2] for i, (s, r) in enumerate(self.symbols.items())}
        for a in [self.assignment(w) for w in ("min", "opt", "max")] + [mixed]:
            key = tuple(sorted(a.items()))
            if key not in seen:
                seen.add(key)
                out.append(a)
        return out

    def sample_inputs(self, values: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for t in self.inputs:
            shape = t.shape(values)
            if t.dtype.startswith("int"):
                out[t.name] = rng.integers(int(t.low), int(t.high), size=shape).astype(NP_DTYPES[t.dtype])
            else:
                out[t.name] = rng.uniform(t.low, t.high, size=shape).astype(NP_DTYPES[t.dtype])
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["profile"] = self.profile()
        return d

    @classmethod
    def from_json(cls, d: dict) -> ComponentSpec:
        """The spec as export wrote it into the manifest (`to_json`)."""
        ts = lambda lst: tuple(TensorSpec(**{**t, "dims": tuple(t["dims"])}) for t in lst)
        return cls(d["name"], ts(d["inputs"]), ts(d["outputs"]), {k: tuple(v) for k, v in d["symbols"].items()},
                   d["tolerance"], d["note"])
