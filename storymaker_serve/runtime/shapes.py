"""Symbolic dims of the I/O specs: `"h"`, `"h/2"`, `"8*h"`, `"2*B"` evaluated for given symbol values.

Shared by runtime/spec.py (which writes specs into the manifest) and runtime/
(which reads them back to shape inputs such as zero ControlNet residuals).
"""
from __future__ import annotations

import re

DIM = re.compile(r"^(?:(\d+)\*)?([A-Za-z_]\w*)(?:/(\d+))?$")


def eval_dim(dim: int | str, values: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    m = DIM.match(dim)
    if not m:
        raise ValueError(f"bad dim expression {dim!r}: use SYM, K*SYM or SYM/K")
    mul, sym, div = int(m.group(1) or 1), m.group(2), int(m.group(3) or 1)
    v = values[sym] * mul
    if v % div:
        raise ValueError(f"dim {dim} is not integral for {sym}={values[sym]}")
    return v // div


def dim_name(dim: str) -> str:
    """ONNX dynamic-axis name for an expression: '2*B' -> 'B_x2', 'h/2' -> 'h_d2'."""
    m = DIM.match(dim)
    return m.group(2) + (f"_x{m.group(1)}" if m.group(1) else "") + (f"_d{m.group(3)}" if m.group(3) else "")
