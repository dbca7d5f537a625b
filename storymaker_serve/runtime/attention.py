"""StoryMaker's UNet attention processors: LoRA self-attention and decoupled cross-attention.

Implements the release's attention (paper Sec. 3.3; IP-Adapter's decoupled
cross-attention with LoRA): every `attn1` adds `lora_scale * up(down(x))` to
to_q/to_k/to_v/to_out[0]; every `attn2` does the same on the text branch and
adds an image branch, `h = Attn(Q, K_t, V_t) + ip_scale * Attn(Q, K_ip, V_ip)`
before to_out, where the first 77 context tokens are text and the rest image
tokens. One class, `StoryMakerAttnProcessor`, covers the four cases (LoRA or
fused, with or without the image branch); its parameter names are the
checkpoint's (`to_q_lora.down.weight`, `to_k_ip.weight`, ...). It follows
diffusers' processor protocol, and `ip_scale` may be passed per call (a float or
a 0-d tensor) through `cross_attention_kwargs={"ip_scale": ...}`, which is how
the exported UNet takes it as a runtime input.

`use_fused_projections(unet)` (torch-opt's `fused_qkv`) gives each LoRA-free
processor one Linear for Q|K|V (self-attention), K|V (text) and K_ip|V_ip
(image): one GEMM instead of three or two. The original Linears' weights become
views into the fused ones, so no weight is stored twice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEXT_TOKENS = 77  # the release splits encoder_hidden_states at 77: text first, then image tokens


class LoRALinearLayer(nn.Module):
    """up(down(x)) with no alpha scaling (the release's LoRA layer)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    b, _, inner = q.shape
    d = inner // heads
    split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)              # (B, heads, N, d)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, inner).to(q.dtype)          # (B, N, inner)


def _fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One bias-free Linear computing cat([p(x) for p in parts], -1); each part's weight becomes a view into it."""
    w = torch.cat([p.weight for p in parts])                                 # (sum out, in)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    row = 0
    for p in parts:
        n = p.weight.shape[0]
        p.weight = nn.Parameter(w[row:row + n], requires_grad=False)          # alias: the old Linear still works
        row += n
    return fused


def use_fused_projections(unet) -> int:
    """Fuse Q/K/V (self) and K/V, K_ip/V_ip (cross) in every StoryMaker processor of `unet`; returns how many."""
    n = 0
    for name, p in unet.attn_processors.items():
        if isinstance(p, StoryMakerAttnProcessor):
            p.fuse_projections(unet.get_submodule(name[: -len(".processor")]))
            n += 1
    return n


class StoryMakerAttnProcessor(nn.Module):
    """Attention with optional LoRA (rank > 0) and optional decoupled image branch (ip)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int | None, rank: int = 0, ip: bool = False,
                 lora_scale: float = 1.0, ip_scale: float = 1.0, text_tokens: int = TEXT_TOKENS):
        super().__init__()
        ctx = cross_attention_dim or hidden_size
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.rank, self.lora_scale, self.ip_scale, self.text_tokens = rank, lora_scale, ip_scale, text_tokens
        if rank:
            self.to_q_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
            self.to_k_lora = LoRALinearLayer(ctx, hidden_size, rank)
            self.to_v_lora = LoRALinearLayer(ctx, hidden_size, rank)
            self.to_out_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.ip = ip
        self.qkv = self.kv = self.kv_ip = None                               # set by fuse_projections
        if ip:
            self.to_k_ip = nn.Linear(ctx, hidden_size, bias=False)
            self.to_v_ip = nn.Linear(ctx, hidden_size, bias=False)

    @classmethod
    def from_processor(cls, p: StoryMakerAttnProcessor, drop_lora: bool = False) -> StoryMakerAttnProcessor:
        """A processor of class `cls` sharing p's weights (to_k_ip/to_v_ip, and LoRA unless drop_lora)."""
        new = cls(p.hidden_size, p.cross_attention_dim, rank=0, ip=False, lora_scale=p.lora_scale,
                  ip_scale=p.ip_scale, text_tokens=p.text_tokens)
        new.rank, new.ip = (0 if drop_lora else p.rank), p.ip
        for name, child in p.named_children():
            if not (drop_lora and name.endswith("_lora")):
                setattr(new, name, child)
        return new

    @torch.no_grad()
    def fuse_projections(self, attn) -> None:
        """Concatenate the projection weights (rank 0 only: fuse the LoRA first) and alias the originals to them."""
        if self.rank:
            raise ValueError("fuse the LoRA (fuse=True at load) before fusing the Q/K/V projections")
        if any(lin.bias is not None for lin in (attn.to_q, attn.to_k, attn.to_v)):
            raise NotImplementedError("fused projections expect bias-free to_q/to_k/to_v, as in SDXL")
        if self.cross_attention_dim is None:
            self.qkv = _fused_linear(attn.to_q, attn.to_k, attn.to_v)
        else:
            self.kv = _fused_linear(attn.to_k, attn.to_v)
            if self.ip:
                self.kv_ip = _fused_linear(self.to_k_ip, self.to_v_ip)

    def _proj(self, linear: nn.Module, lora_name: str, x: torch.Tensor) -> torch.Tensor:
        y = linear(x)
        if self.rank:
            y = y + self.lora_scale * getattr(self, lora_name)(x)
        return y

    def dual_attention(self, q, k, v, k_ip, v_ip, heads: int, mask, scale) -> torch.Tensor:
        """Attn(q, k, v) + scale * Attn(q, k_ip, v_ip), all (B, N, heads*d); scale float, 0-d or (B,).
        The reference: two SDPA calls. kernels/ overrides this with one fused kernel."""
        if torch.is_tensor(scale) and scale.ndim == 1:   # per-sample (batched requests): (B,) -> (B, 1, 1)
            scale = scale.view(-1, 1, 1)
        return _sdpa(q, k, v, heads, mask) + scale * _sdpa(q, k_ip, v_ip, heads)

    # __call__ (not forward) so diffusers sees `ip_scale` in the signature and passes it through.
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_scale: torch.Tensor | float | None = None, **kwargs) -> torch.Tensor:
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("StoryMaker processors expect SDXL transformer-block attention (3-D, no norms)")
        residual = hidden_states
        b = hidden_states.shape[0]                                            # (B, N, C)
        if encoder_hidden_states is None:
            context, ip_context = hidden_states, None
        elif self.ip:
            context = encoder_hidden_states[:, : self.text_tokens]            # (B, 77, D)
            ip_context = encoder_hidden_states[:, self.text_tokens:]          # (B, T_img, D)
        else:
            context, ip_context = encoder_hidden_states, None
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])

        if self.qkv is not None and encoder_hidden_states is None:
            q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)                 # strided views, no copies
        else:
            q = self._proj(attn.to_q, "to_q_lora", hidden_states)
            if self.kv is not None:
                k, v = self.kv(context).chunk(2, dim=-1)
            else:
                k = self._proj(attn.to_k, "to_k_lora", context)
                v = self._proj(attn.to_v, "to_v_lora", context)
        if ip_context is None:
            h = _sdpa(q, k, v, attn.heads, attention_mask)
        else:
            scale = self.ip_scale if ip_scale is None else ip_scale
            if self.kv_ip is not None:
                k_ip, v_ip = self.kv_ip(ip_context).chunk(2, dim=-1)
            else:
                k_ip, v_ip = self.to_k_ip(ip_context), self.to_v_ip(ip_context)
            h = self.dual_attention(q, k, v, k_ip, v_ip, attn.heads, attention_mask, scale)
        h = self._proj(attn.to_out[0], "to_out_lora", h)
        h = attn.to_out[1](h)                                                 # dropout (identity in eval)
        if attn.residual_connection:
            h = h + residual
        return h / attn.rescale_output_factor
