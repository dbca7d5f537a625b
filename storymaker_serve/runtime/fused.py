"""Fused host kernels for the denoising loop's own arithmetic, bit-identical to the torch ops they replace.

On a CPU (the `inprocess` frame models on a host without a GPU, and the served-overhead benchmark's stand-in
engines) two pieces of our own arithmetic run between the engines on the host:

- the step: classifier-free guidance and one UniPC predictor-corrector update (runtime/unipc.py), 26 elementwise
  torch ops per step over the latents, each a pass over memory (measured: ~0.4 ms per step at 960x1280);
- the decode's rounding: image in [0, 1] -> uint8 HWC (runtime/denoise.py's `decode`), four passes over 14.7 MB.

Here each is one loop compiled by numba, doing per element exactly the float32 operations the torch ops do, in
the same order with the same operands, so the results are bit-identical (tests/test_fused.py compares them with
`torch.equal` over whole sampling runs): every multiply, add, subtract and divide is one IEEE float32 operation
rounded to nearest, with no contraction into fused multiply-adds (numba compiles without fast-math flags) and no
division turned into a multiplication; Python-float coefficients are rounded to float32 first, as torch does with a
scalar operand of a float32 tensor.

Anything else (tensors on a GPU, where these ops are device kernels queued behind the UNet; other dtypes;
non-contiguous tensors; a solver order above 2; numba missing) keeps the torch ops: the callers try `unipc_step`
/ `to_uint8`, which answer None when they do not apply. `STORYMAKER_FUSED=0` turns the kernels off.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch

log = logging.getLogger("storymaker.fused")

_kernels = None
_lock = threading.Lock()


def enabled() -> bool:
    """Whether the kernels are used: numba importable and STORYMAKER_FUSED not 0."""
    return os.environ.get("STORYMAKER_FUSED", "1") != "0" and _load() is not None


def _load():
    """The compiled kernels (compiled on first use, cached on disk by numba), or None without numba."""
    global _kernels
    if _kernels is not None:
        return _kernels or None
    with _lock:
        if _kernels is None:
            try:
                _kernels = _compile()
            except ImportError:
                log.info("numba is not installed: the denoising loop's host arithmetic runs as torch ops")
                _kernels = False
            except Exception as e:  # noqa: BLE001 - e.g. no writable cache folder: same numbers, slower
                log.warning("numba could not load the fused kernels (%s: %s); the denoising loop's host arithmetic "
                            "runs as torch ops. Set NUMBA_CACHE_DIR to a writable folder to use them",
                            type(e).__name__, e)
                _kernels = False
        return _kernels or None


def _compile():
    from storymaker_serve.runtime import fused_kernels

    return {"unipc": fused_kernels.unipc, "uint8": fused_kernels.uint8}


def warm_up() -> None:
    """Compile (or load from numba's cache) both kernels now, so no request pays for it (the served models call this
    at load). numba compiles once per argument types; the step's case flags are values, so one call each is all."""
    if not enabled():
        return
    a = np.zeros(2, np.float32)
    _load()["unipc"]((np.zeros(4, np.float32), a, a, a, a, a.copy(), a.copy(), np.zeros(4, np.float32)),
                     tuple(np.float32(1) for _ in range(15)), True, True, True)
    to_uint8(np.zeros((3, 2, 2), np.float32))


def _flat(t: torch.Tensor) -> np.ndarray | None:
    """t as a flat float32 numpy view (no copy), or None if it is not one on the host. Tensors this module made
    carry theirs (`_host_flat`): a step's inputs are mostly the last step's outputs."""
    a = t.__dict__.get("_host_flat")
    if a is not None:
        return a
    return t.reshape(-1).numpy() if (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                                     and not t.requires_grad) else None


def _new(shape) -> tuple[torch.Tensor, np.ndarray]:
    t = torch.empty(shape)          # torch's allocator: numpy's maps and unmaps fresh pages for each 300 KB latent
    a = t._host_flat = t.view(-1).numpy()
    return t, a


def _coefficients(plan, i: int, corr: bool) -> tuple | None:
    """Step i's case flags and float32 coefficients (the Python floats rounded as torch rounds a scalar operand of
    a float32 tensor), kept on the plan; None for a case the kernel lacks (more than one older model output)."""
    cache = plan.__dict__.setdefault("_fused", {})
    if (i, corr) not in cache:
        f, c, q = np.float32, plan.corr[i] if corr else None, plan.pred[i]
        if (c is not None and len(c.rks) > 1) or len(q.rks) > 1:
            cache[i, corr] = None
        else:
            sigma, alpha = plan.convert[i]
            cc = (f(c.a), f(c.b), f(c.c), f(c.rks[0] if c.rks else 1), f(c.rhos[0]), f(c.rhos[-1])) if corr \
                else (f(1),) * 6
            k = (f(sigma), f(alpha), *cc, f(q.a), f(q.b), f(q.c), f(q.rks[0] if q.rks else 1),
                 f(q.rhos[0] if q.rhos else 1), f(q.c * 0))
            cache[i, corr] = ((corr, bool(corr and c.rks), bool(q.rks)), k)
    return cache[i, corr]


def unipc_step(sampler, eps2: torch.Tensor, guidance: float, i: int, x: torch.Tensor) -> torch.Tensor | None:
    """`sampler.step(uncond + guidance * (cond - uncond), i, x)` for eps2 = [uncond, cond] rows, in one pass,
    bit-identical, updating the sampler's state the same way; None (nothing done) where the kernel does not apply.
    The pass also writes the result twice into `sampler.pair`, the next step's CFG batch (`UniPCSampler.doubled`)."""
    p, n = sampler.plan, x.numel()
    if not enabled() or p.solver_order > 2 or eps2.shape[0] != 2 or eps2.numel() != 2 * n or x.shape[0] != 1:
        return None
    corr = i > 0 and sampler.last is not None
    e, xf, ms = _flat(eps2), _flat(x), [_flat(m) for m in sampler.ms[-2:]]
    last = _flat(sampler.last) if corr else xf
    if e is None or any(a is None or a.size != n for a in (xf, last, *ms)):
        return None
    plan_k = _coefficients(p, i, corr)
    if plan_k is None or (plan_k[0][2] and not ms):
        return None
    case, k = plan_k
    m1 = ms[-1] if ms else xf               # unused where the case does not read it
    m2 = ms[-2] if len(ms) > 1 else xf
    (out_m, fm), (out_last, fl), (pair, fx) = _new(x.shape), _new(x.shape), _new((2, *x.shape[1:]))
    _load()["unipc"]((e, xf, last, m1, m2, fm, fl, fx), (np.float32(guidance), *k), *case)
    sampler.ms = (sampler.ms + [out_m])[-p.solver_order:]
    sampler.last = out_last
    out_x = pair[:1]
    out_x._host_flat = fx[:n]
    sampler.pair = (out_x, pair)              # the next step's CFG batch, written by the kernel too
    return out_x


def to_uint8(img) -> tuple[np.ndarray, int] | None:
    """(3, H, W) float32 image in [0, 1] on the host -> ((H, W, 3) uint8 as `decode` rounds it, count of non-finite
    pixels), or None where the kernel does not apply. Values are clamped to [0, 255] after rounding (a no-op for
    the decoder's [0, 1] output; the torch ops wrap there: 256 becomes 0)."""
    if not enabled():
        return None
    if torch.is_tensor(img):
        if img.device.type != "cpu" or img.dtype != torch.float32:
            return None
        img = img.detach().numpy()
    img = np.ascontiguousarray(img, np.float32)
    if img.ndim != 3 or img.shape[0] != 3:
        return None
    out = np.empty((img.shape[1], img.shape[2], img.shape[0]), np.uint8)
    bad = _load()["uint8"](img, out)
    return out, int(bad)
