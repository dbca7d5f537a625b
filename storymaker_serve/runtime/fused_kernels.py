"""The numba kernels of runtime/fused.py (imported only where numba is installed; see that module for what they
compute and why they are bit-identical to the torch ops)."""
from __future__ import annotations

import numba
import numpy as np

f32 = np.float32
jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@numba.njit(inline="always")
def _elem(j, arrays, k, corr, c_old, p_old):
    eps2, x, last, m1, m2, out_m, out_last, out_x = arrays
    g, sigma, alpha, ca, cb, cc, c_rk, c_rho, c_rhot, pa, pb, pc, p_rk, p_rho, p_zero = k
    # runtime/denoise.py: eps = uncond + guidance * (cond - uncond)
    u = eps2[j]
    e = u + g * (eps2[x.size + j] - u)
    # UniPCSampler.step: m = (sample - sigma * eps) / alpha
    s = x[j]
    m = (s - sigma * e) / alpha
    if corr:            # UniPCSampler._apply, corrector: x_t_ - c * (res + rho_t * (m_t - m0)), res = 0 or d1 * rho
        m0 = m1[j]
        xt = ca * last[j] - cb * m0
        r = ((m2[j] - m0) / c_rk) * c_rho if c_old else f32(0.0)
        s = xt - cc * (r + c_rhot * (m - m0))
    out_m[j] = m
    out_last[j] = s
    xt = pa * s - pb * m                     # predictor over [m1, m] (newest last): m0 = m
    v = xt - pc * (((m1[j] - m) / p_rk) * p_rho) if p_old else xt - p_zero
    out_x[j] = v
    out_x[x.size + j] = v                    # twice: the next step's CFG batch [x, x]


@jit
def unipc(arrays, k, corr, c_old, p_old):
    """arrays: (eps2, x, last, m1, m2, out_m, out_last, out_x), flat float32 (eps2 and out_x twice as long as x:
    the CFG batch); k: the 15 float32 coefficients. One
    loop per case with the case a constant inside it, so each loop is branch-free and vectorises."""
    n = arrays[1].size
    if corr and c_old and p_old:
        for j in range(n):
            _elem(j, arrays, k, True, True, True)
    elif corr and c_old:
        for j in range(n):
            _elem(j, arrays, k, True, True, False)
    elif corr and p_old:
        for j in range(n):
            _elem(j, arrays, k, True, False, True)
    elif corr:
        for j in range(n):
            _elem(j, arrays, k, True, False, False)
    elif p_old:
        for j in range(n):
            _elem(j, arrays, k, False, False, True)
    else:
        for j in range(n):
            _elem(j, arrays, k, False, False, False)


@jit
def uint8(img, out):
    """runtime/denoise.py's decode: (3, H, W) -> (H, W, 3) round(x * 255) half to even, clamped to [0, 255];
    returns the count of non-finite pixels."""
    c, h, w = img.shape
    bad = 0
    tmp = np.empty((c, w), np.uint8)
    for y in range(h):
        for ch in range(c):
            row, t = img[ch, y], tmp[ch]
            for i in range(w):
                v = row[i] * f32(255.0)
                bad += not np.isfinite(v)
                t[i] = np.uint8(min(max(np.rint(v), f32(0.0)), f32(255.0)))
        o = out[y]
        for i in range(w):                   # RGB (to_uint8 checks): unrolled, twice as fast as a loop over c
            o[i, 0] = tmp[0, i]
            o[i, 1] = tmp[1, i]
            o[i, 2] = tmp[2, i]
    return bad
