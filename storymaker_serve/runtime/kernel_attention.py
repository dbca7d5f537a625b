"""Decoupled cross-attention through the fused Triton kernel (kernels/dual_attention.py).

`KernelAttnProcessor` is a `StoryMakerAttnProcessor` whose text + image
attention step runs as one fused kernel launch when it can: CUDA tensors (or
CPU tensors under `TRITON_INTERPRET=1`, which is how the tests exercise it), no
attention mask, a head dim the kernel supports. Otherwise it falls back to the
reference (two SDPA calls), so the processor is always safe to install.
`use_dual_attention_kernel(unet)` swaps it into every cross-attention of a
StoryMaker UNet in place, keeping the to_k_ip/to_v_ip modules (and any LoRA).
"""
from __future__ import annotations

import logging

import torch

from storymaker_serve.runtime.attention import StoryMakerAttnProcessor

log = logging.getLogger(__name__)


def kernel_unavailable(device: torch.device | str) -> str | None:
    """Why the fused kernel cannot run on `device` (None when it can): OpenAI Triton missing or older than the
    kernel needs (kernels.dual_attention.MIN_TRITON), or a CPU without Triton's interpreter."""
    try:
        from storymaker_serve.kernels.dual_attention import INTERPRET
    except ImportError as e:   # triton missing or too old: say which
        return str(e) or "OpenAI Triton is not installed"
    device = torch.device(device)
    if device.type == "cuda" or (INTERPRET and device.type == "cpu"):
        return None
    return f"no fused kernel on device {device.type!r} (CUDA, or a CPU with TRITON_INTERPRET=1)"


def kernel_available(device: torch.device) -> bool:
    return kernel_unavailable(device) is None


class KernelAttnProcessor(StoryMakerAttnProcessor):
    def dual_attention(self, q, k, v, k_ip, v_ip, heads: int, mask, scale) -> torch.Tensor:
        d = q.shape[-1] // heads
        if mask is not None or d not in (16, 32, 64, 128) or not kernel_available(q.device):
            return super().dual_attention(q, k, v, k_ip, v_ip, heads, mask, scale)
        from storymaker_serve.kernels.dual_attention import dual_attention

        b = q.shape[0]
        split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)              # (B, heads, N, d), no copy
        out = dual_attention(split(q), split(k), split(v), split(k_ip), split(v_ip), scale)  # (B, heads, M, d)
        return out.transpose(1, 2).reshape(b, -1, heads * d)                  # (B, M, heads*d), a view


class KernelUnavailable(RuntimeError):
    pass


def use_dual_attention_kernel(unet, device: torch.device | str | None = None, strict: bool | None = None) -> int:
    """Install KernelAttnProcessor on every decoupled cross-attention; returns how many.

    The kernel was asked for: where it cannot run on the UNet's device the processors would silently compute
    two SDPA calls while a benchmark reports the kernel, so this raises KernelUnavailable with the reason
    (Triton missing or older than the kernel needs). `strict=False` installs anyway (the processors fall back
    per call) and logs the reason; the default is strict on CUDA, where the kernel is the point. `device`: where
    the UNet will run (default: where its parameters are now)."""
    if device is None:
        p = next(unet.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    why = kernel_unavailable(device)
    if why and (strict if strict is not None else device.type == "cuda"):
        raise KernelUnavailable(f"--dual-attention-kernel was requested but cannot run: {why}")
    if why:
        log.warning("dual-attention kernel installed but it will fall back to two SDPA calls: %s", why)
    procs, n = {}, 0
    for name, p in unet.attn_processors.items():
        if isinstance(p, StoryMakerAttnProcessor) and p.ip:
            procs[name], n = KernelAttnProcessor.from_processor(p), n + 1
        else:
            procs[name] = p
    unet.set_attn_processor(procs)
    log.info("dual-attention kernel installed on %d cross-attention processors", n)
    return n
