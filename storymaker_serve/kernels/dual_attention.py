"""Fused dual-stream (text + image) cross-attention for StoryMaker's decoupled attention, in OpenAI Triton.

StoryMaker's cross-attention computes, for the same queries (paper Sec. 3.3):

    O = softmax(Q K_t^T / sqrt(d)) V_t  +  ip_scale * softmax(Q K_ip^T / sqrt(d)) V_ip

with 77 text keys and 20(n+1) = 40..80 image keys, head dim 64 in SDXL. Run as
two attention calls plus a scaled add, it reads Q twice, writes two (B, H, M, d)
results, reads both back and writes the sum: 7 * B*H*M*d elements of activation
traffic besides K/V. This kernel walks both key sets in one program per (query
block, batch*head) with two online-softmax accumulators (flash-attention style,
fp32 statistics and accumulators, exp2 with log2(e) folded into the scale),
masks the ragged tail of each key set, and writes O once: 2 * B*H*M*d. For SDXL
at 1024^2 (M = 4096, H = 10, d = 64, B = 2, fp16) one B*H*M*d tensor is 10.5 MB,
so a 64x64-level cross-attention moves 21 MB instead of 73 MB; the K/V sets
(<= 157 keys per head) stay in L2.

Layout: tensors are (B, H, N, d) views with arbitrary strides, so the
processor passes `to_q` outputs reshaped without copies and gets O back in the
(B, M, H*d) layout `to_out` wants. `ip_scale` is per batch element (a (B,)
float32 tensor), so batched requests with different scales share one launch.
Runs natively on CUDA (fp16/bf16/fp32 inputs, fp32 accumulation) and, with
`TRITON_INTERPRET=1`, on CPU tensors through Triton's interpreter (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MIN_TRITON = (3, 4)     # triton.knobs (interpreter switch) and the tl.dot input_precision names used below


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())


if _version(triton.__version__) < MIN_TRITON:
    raise ImportError(f"kernels.dual_attention needs OpenAI Triton >= {'.'.join(map(str, MIN_TRITON))}, found "
                      f"{triton.__version__} (pip install 'triton>={'.'.join(map(str, MIN_TRITON))}')")
from triton import knobs  # noqa: E402  (exists from 3.4 on)

INTERPRET = bool(knobs.runtime.interpret)


def dual_attention_reference(q, k_t, v_t, k_ip, v_ip, ip_scale):
    """Two SDPA calls: (B, H, M, d) each; ip_scale a float or a (B,) tensor."""
    s = ip_scale.view(-1, 1, 1, 1) if torch.is_tensor(ip_scale) else ip_scale
    f = torch.nn.functional.scaled_dot_product_attention
    return f(q, k_t, v_t) + s * f(q, k_ip, v_ip)


@triton.jit
def _attend(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, N, qk_scale,
            offs_n, offs_d, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax pass of q (BLOCK_M, D) over N keys; returns the updated (acc, m, l)."""
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n                                                   # (BLOCK_N,)
        valid = cols < N
        k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=valid[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale              # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dual_attn_fwd_kernel(
    Q, KT, VT, KI, VI, O, IP_SCALE,  # noqa: E741 - the kernel's tensors, named as in the docstring
    sq_b, sq_h, sq_m, sq_d, skt_b, skt_h, skt_n, skt_d, svt_b, svt_h, svt_n, svt_d,
    ski_b, ski_h, ski_n, ski_d, svi_b, svi_h, svi_n, svi_d, so_b, so_h, so_m, so_d,
    H, M, N_T, N_I, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                            # (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=offs_m[:, None] < M, other=0.0)                   # (BLOCK_M, D), read once

    zero = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m0 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_t, m_t, l_t = _attend(zero, m0, l0, q, KT + b * skt_b + h * skt_h, VT + b * svt_b + h * svt_h,
                              skt_n, skt_d, svt_n, svt_d, N_T, qk_scale, offs_n, offs_d, BLOCK_N, DOT_PRECISION)
    acc_i, m_i, l_i = _attend(zero, m0, l0, q, KI + b * ski_b + h * ski_h, VI + b * svi_b + h * svi_h,
                              ski_n, ski_d, svi_n, svi_d, N_I, qk_scale, offs_n, offs_d, BLOCK_N, DOT_PRECISION)
    scale = tl.load(IP_SCALE + b)
    out = acc_t / l_t[:, None] + scale * (acc_i / l_i[:, None])                # (BLOCK_M, D), fp32
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < M)


def _prune(configs, named_args, **kwargs):
    """Drop query blocks far larger than M and key blocks larger than the longer key set."""
    m, n = named_args["M"], max(named_args["N_T"], named_args["N_I"])
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n))]
    return keep or configs[:1]


CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
           for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for s in (2, 3)]
_dual_attn_fwd_tuned = triton.autotune(CONFIGS, key=["M", "N_T", "N_I", "HEAD_DIM"],
                                       prune_configs_by={"early_config_prune": _prune})(_dual_attn_fwd_kernel)


def dual_attention(q, k_t, v_t, k_ip, v_ip, ip_scale, block_m: int = 32, block_n: int = 32):
    """Fused O = Attn(q, k_t, v_t) + ip_scale * Attn(q, k_ip, v_ip).

    q: (B, H, M, d); k_t, v_t: (B, H, N_t, d); k_ip, v_ip: (B, H, N_i, d); any strides. ip_scale: float
    or (B,) tensor. Returns (B, H, M, d), a view of a (B, M, H, d)-contiguous buffer (to_out's layout).
    block_m/block_n apply in interpreter mode; on a GPU the autotuner picks them.
    """
    b, h, m, d = q.shape
    if d not in (16, 32, 64, 128) or min(k_t.shape[2], k_ip.shape[2]) < 1:
        raise ValueError(f"head dim {d} must be 16, 32, 64 or 128 and both key sets non-empty")
    out = torch.empty((b, m, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)   # (B, H, M, d) view
    if torch.is_tensor(ip_scale):
        scale = ip_scale.to(device=q.device, dtype=torch.float32).reshape(-1).expand(b).contiguous()  # (B,)
    else:   # a Python number: filled on the device (a host tensor would cost a blocking copy per call)
        scale = torch.full((b,), float(ip_scale), device=q.device, dtype=torch.float32)
    args = [q, k_t, v_t, k_ip, v_ip, out, scale, *q.stride(), *k_t.stride(), *v_t.stride(), *k_ip.stride(),
            *v_ip.stride(), *out.stride(), h, m, k_t.shape[2], k_ip.shape[2], (1.0 / math.sqrt(d)) * 1.4426950408889634]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if INTERPRET or not q.is_cuda:
        grid = (triton.cdiv(m, block_m), b * h)
        _dual_attn_fwd_kernel[grid](*args, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), b * h)
        _dual_attn_fwd_tuned[grid](*args, HEAD_DIM=d, DOT_PRECISION=precision)
    return out
