"""Parity: every exported ONNX file against its PyTorch reference, on seeded inputs at several shapes.

For each shape assignment of the component's spec (min, opt and max of every
dynamic symbol, so every dynamic axis takes >= 2 values; the resampler 1, 2
and 3 characters) the ONNX file runs in an onnxruntime CPU session and the
reference module in PyTorch on the same inputs. fp32 passes on max abs error
<= the spec's tolerance (optimum's: UNet 1e-4, VAE 3e-4, CLIP 1e-3); fp16
passes on cosine similarity >= 0.999 per output. A session that cannot run
(e.g. an op without a CPU kernel) is recorded as "not run", never as passed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.spec import ComponentSpec

FP16_MIN_COS = 0.999


@dataclass
class ParityResult:
    max_abs_err: float | None
    cos_sim: float | None
    tolerance: str
    passed: bool
    status: str                     # "passed" | "failed" | "not run: <reason>"
    shapes: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check(spec: ComponentSpec, onnx_path: Path, reference: torch.nn.Module, precision: str = "fp32",
          assignments: list[dict] | None = None) -> ParityResult:
    tol = f"max_abs <= {spec.tolerance}" if precision == "fp32" else f"cos_sim >= {FP16_MIN_COS}"
    try:
        sess = session(onnx_path)
    except Exception as e:  # onnxruntime raises its own exception types
        return ParityResult(None, None, tol, False, f"not run: onnxruntime cannot load it ({str(e)[:160]})")
    worst_abs, worst_cos, shapes = 0.0, 1.0, []
    for i, values in enumerate(assignments or spec.parity_assignments()):
        feeds = spec.sample_inputs(values, seed=i)
        try:
            got = sess.run([t.name for t in spec.outputs], feeds)
        except Exception as e:
            return ParityResult(None, None, tol, False, f"not run: onnxruntime failed at {values} ({str(e)[:160]})")
        want = reference(*[torch.from_numpy(a) for a in feeds.values()])
        want = [w.float().numpy() for w in (want if isinstance(want, (tuple, list)) else (want,))]
        for g, w, t in zip(got, want, spec.outputs):
            if g.shape != w.shape:
                return ParityResult(None, None, tol, False, f"failed: {t.name} shape {g.shape} != reference {w.shape}")
            worst_abs = max(worst_abs, float(np.abs(g.astype(np.float64) - w).max()))
            worst_cos = min(worst_cos, _cos(g, w))
        shapes.append({k: int(v) for k, v in values.items()})
    ok = worst_abs <= spec.tolerance if precision == "fp32" else worst_cos >= FP16_MIN_COS
    return ParityResult(worst_abs, worst_cos, tol, bool(ok), "passed" if ok else "failed", shapes)
