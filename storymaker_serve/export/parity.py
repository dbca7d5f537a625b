"""Parity: every exported ONNX file against its PyTorch reference, on seeded inputs at several shapes.

For each shape assignment of the component's spec (min, opt and max of every
dynamic symbol, so every dynamic axis takes >= 2 values; the resampler 1, 2
and 3 characters) the ONNX file runs in an onnxruntime CPU session and the
reference module in PyTorch on the same inputs. `--parity quick` checks only the
minimum assignment (the full-size default: one UNet shape costs about a minute
here), `full` all of them (the demo default), `off` none ("not run").

Tolerances, stated per result: fp32 passes on max abs error <= the spec's
tolerance (optimum's: UNet 1e-4, VAE 3e-4, CLIP 1e-3) times the output scale
max(1, max|reference|): an absolute bound for outputs of unit scale, a relative
one for larger outputs (a full-size random CLIP-H's hidden states reach tens), so
fp32 rounding that grows with the magnitude does not fail a correct graph. fp16
passes on cosine similarity >= 0.999 per output. Every result also records the
reference scale, the relative error (max abs / scale) and the cosine. Reference
outputs are computed once (`reference_cases`) before the module is freed, so a
full-size build never holds the PyTorch model and the onnxruntime session at once.
A session that cannot run (e.g. an op without a CPU kernel) is recorded as "not
run", never as passed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from storymaker_serve.runtime.spec import ComponentSpec

FP16_MIN_COS = 0.999


@dataclass
class ParityResult:
    max_abs_err: float | None
    cos_sim: float | None
    tolerance: str
    passed: bool
    status: str                     # "passed" | "failed" | "not run: <reason>"
    shapes: list[dict] = field(default_factory=list)
    ref_scale: float | None = None  # max |reference output|
    rel_err: float | None = None    # max_abs_err / max(1, ref_scale)

    def to_json(self) -> dict:
        return asdict(self)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def session(path: Path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


MODES = ("auto", "full", "quick", "off")


def assignments(spec: ComponentSpec, mode: str) -> list[dict]:
    """The shape assignments a parity mode checks (auto is resolved by the build: full on the demo bundle)."""
    if mode not in ("full", "quick", "off"):
        raise ValueError(f"parity mode {mode!r}: use full, quick or off")
    return {"full": spec.parity_assignments, "quick": lambda: [spec.assignment("min")], "off": list}[mode]()


@dataclass
class Case:
    values: dict
    feeds: dict
    want: list


@torch.no_grad()
def reference_cases(spec: ComponentSpec, reference, values_list: list[dict]) -> list[Case]:
    """Seeded inputs and the reference's outputs for each assignment (computed once, kept as numpy)."""
    cases = []
    for i, values in enumerate(values_list):
        feeds = spec.sample_inputs(values, seed=i)
        want = reference(*[torch.from_numpy(a) for a in feeds.values()])
        cases.append(Case(values, feeds,
                          [w.float().numpy() for w in (want if isinstance(want, (tuple, list)) else (want,))]))
    return cases


def check(spec: ComponentSpec, onnx_path: Path, reference, precision: str = "fp32",
          assignments: list[dict] | None = None) -> ParityResult:
    """`reference`: a module (run here on `assignments`, default all of the spec's) or `reference_cases`' list."""
    tol = (f"max_abs <= {spec.tolerance} x max(1, max|ref|)" if precision == "fp32" else f"cos_sim >= {FP16_MIN_COS}")
    cases = reference if isinstance(reference, list) else \
        reference_cases(spec, reference, assignments or spec.parity_assignments())
    if not cases:
        return ParityResult(None, None, tol, False, "not run: --parity off")
    try:
        sess = session(onnx_path)
    except Exception as e:  # onnxruntime raises its own exception types
        return ParityResult(None, None, tol, False, f"not run: onnxruntime cannot load it ({str(e)[:160]})")
    worst_abs, worst_cos, worst_rel, scale, shapes = 0.0, 1.0, 0.0, 0.0, []
    for c in cases:
        try:
            got = sess.run([t.name for t in spec.outputs], c.feeds)
        except Exception as e:
            return ParityResult(None, None, tol, False, f"not run: onnxruntime failed at {c.values} ({str(e)[:160]})")
        for g, w, t in zip(got, c.want, spec.outputs):
            if g.shape != w.shape:
                return ParityResult(None, None, tol, False, f"failed: {t.name} shape {g.shape} != reference {w.shape}")
            err, s = float(np.abs(g.astype(np.float64) - w).max()), float(np.abs(w).max())
            worst_abs, scale = max(worst_abs, err), max(scale, s)
            worst_rel = max(worst_rel, err / max(1.0, s))
            worst_cos = min(worst_cos, _cos(g, w))
        shapes.append({k: int(v) for k, v in c.values.items()})
    ok = worst_rel <= spec.tolerance if precision == "fp32" else worst_cos >= FP16_MIN_COS
    return ParityResult(worst_abs, worst_cos, tol, bool(ok), "passed" if ok else "failed", shapes, scale, worst_rel)
