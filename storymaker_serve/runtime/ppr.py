"""Positional-aware Perceiver Resampler (PPR), StoryMaker's `image_proj_model`.

Implements the `faceid_plus` image projection of the StoryMaker release
(paper Sec. 3.2, "Positional-aware Perceiver Resampler"): an ArcFace id
embedding becomes 4 tokens refined by a face Perceiver over the CLIP features
of the aligned face; the CLIP features of the masked character image become 16
tokens through a Perceiver Resampler; both are concatenated, get a learned
per-character position embedding, a residual Linear+LayerNorm, and a learned
background block is prepended. Module and parameter names match the
checkpoint keys of `mask.bin["image_proj_model"]` exactly (`proj.0`, `proj.2`,
`norm`, `perceiver_resampler.*`, `resample.*`, `pos_embed`, `bg_embed`,
`proj_out`, `norm_out`); every size is a field of `PPRConfig`, read from the
checkpoint shapes by `PPRConfig.from_state_dict`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PPRConfig:
    """Sizes of the resampler; the defaults are the released SDXL model's."""

    cross_attention_dim: int = 2048  # D, the UNet's cross_attention_dim
    id_dim: int = 512                # ArcFace embedding
    clip_dim: int = 1280             # CLIP ViT-H/14 hidden size
    num_id_tokens: int = 4
    num_queries: int = 16            # learned queries of `resample`
    face_depth: int = 4
    clip_depth: int = 4
    dim_head: int = 64
    max_characters: int = 3          # rows of pos_embed
    ff_mult: int = 4

    @property
    def tokens_per_character(self) -> int:
        return self.num_id_tokens + self.num_queries  # 20 in the release

    @classmethod
    def from_state_dict(cls, sd: dict) -> PPRConfig:
        """Infer every size from checkpoint tensor shapes (works on meta tensors)."""
        d = sd["norm.weight"].shape[0]
        depth = lambda prefix: 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(prefix + ".layers."))
        return cls(
            cross_attention_dim=d,
            id_dim=sd["proj.0.weight"].shape[1],
            clip_dim=sd["resample.latents"].shape[2],
            num_id_tokens=sd["proj.2.weight"].shape[0] // d,
            num_queries=sd["resample.latents"].shape[1],
            face_depth=depth("perceiver_resampler"),
            clip_depth=depth("resample"),
            max_characters=sd["pos_embed"].shape[0],
            ff_mult=sd["resample.layers.0.1.1.weight"].shape[0] // sd["resample.latents"].shape[2],
        )


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm, Linear(dim, mult*dim, no bias), GELU, Linear(mult*dim, dim, no bias)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)  # (B, heads, N, d)


class PerceiverAttention(nn.Module):
    """Latents attend to concat(features, latents); q and k both scaled by dim_head**-0.25."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)                     # (B, N, dim) features
        latents = self.norm2(latents)         # (B, L, dim)
        b, n_latents, _ = latents.shape
        q = _heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = _heads(k, self.heads), _heads(v, self.heads)
        scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        w = (q * scale) @ (k * scale).transpose(-2, -1)          # (B, heads, L, N+L)
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)
        out = (w @ v).transpose(1, 2).reshape(b, n_latents, -1)  # (B, L, inner)
        return self.to_out(out)


def _layers(dim: int, depth: int, dim_head: int, ff_mult: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleList([PerceiverAttention(dim, dim_head, dim // dim_head), FeedForward(dim, ff_mult)])
        for _ in range(depth)
    )


def _perceive(m: nn.Module, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """proj_in, then residual [attention, feed-forward] layers, proj_out, norm_out (both resamplers)."""
    x = m.proj_in(x)
    for attn, ff in m.layers:
        latents = attn(x, latents) + latents
        latents = ff(latents) + latents
    return m.norm_out(m.proj_out(latents))


class FacePerceiverResampler(nn.Module):
    """Refines given latents (the id tokens) with CLIP features of the aligned face."""

    def __init__(self, dim: int, depth: int, dim_head: int, embedding_dim: int, output_dim: int, ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = _layers(dim, depth, dim_head, ff_mult)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _perceive(self, latents, x)


class Resampler(nn.Module):
    """Perceiver Resampler with learned queries (`latents`) over CLIP features."""

    def __init__(self, dim: int, depth: int, dim_head: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = _layers(dim, depth, dim_head, ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _perceive(self, self.latents.repeat(x.size(0), 1, 1), x)


class PositionalPerceiverResampler(nn.Module):
    """`image_proj_model`: (id [n,512], clip [n,257,C], face [n,257,C]) -> tokens [1, 20(n+1), D]."""

    def __init__(self, cfg: PPRConfig = PPRConfig()):
        super().__init__()
        self.cfg = cfg
        d, c = cfg.cross_attention_dim, cfg.clip_dim
        self.proj = nn.Sequential(
            nn.Linear(cfg.id_dim, cfg.id_dim * 2), nn.GELU(), nn.Linear(cfg.id_dim * 2, d * cfg.num_id_tokens)
        )
        self.norm = nn.LayerNorm(d)
        self.perceiver_resampler = FacePerceiverResampler(d, cfg.face_depth, cfg.dim_head, c, d, cfg.ff_mult)
        self.resample = Resampler(c, cfg.clip_depth, cfg.dim_head, cfg.num_queries, c, d, cfg.ff_mult)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_characters, cfg.tokens_per_character, d))
        self.bg_embed = nn.Parameter(torch.zeros(1, cfg.tokens_per_character, d))
        self.proj_out = nn.Linear(d, d)
        self.norm_out = nn.LayerNorm(d)

    def character_tokens(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor, face_embeds: torch.Tensor,
                         clip_token_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Per-character tokens [n, 20, D] (before the background block is prepended).

        `clip_token_scale` multiplies the 16 character-image tokens before the position
        embedding: 1 is the release's behaviour, 0 is identity-only mode (character tokens
        zeroed, face/id tokens kept). It may be a tensor so that an exported graph takes it
        as a runtime input.
        """
        n, d = id_embeds.shape[0], self.cfg.cross_attention_dim
        x = self.norm(self.proj(id_embeds).reshape(n, self.cfg.num_id_tokens, d))  # (n, 4, D)
        out = x + self.perceiver_resampler(x, face_embeds)                        # shortcut, scale 1
        clip_tokens = self.resample(clip_embeds) * clip_token_scale               # (n, 16, D)
        cat = torch.cat([out, clip_tokens], dim=1) + self.pos_embed[:n]           # (n, 20, D)
        return self.norm_out(self.proj_out(cat)) + cat

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor, face_embeds: torch.Tensor,
                clip_token_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        n = id_embeds.shape[0]
        if not 1 <= n <= self.cfg.max_characters:
            raise ValueError(
                f"{n} characters given; this resampler supports 1 to {self.cfg.max_characters} "
                f"(pos_embed has {self.cfg.max_characters} rows). Pass fewer characters."
            )
        res = self.character_tokens(id_embeds, clip_embeds, face_embeds, clip_token_scale)
        # Release quirk, reproduced on purpose: the learned bg_embed is ALWAYS prepended, also
        # for the all-zero negative (CFG) input. The release's zero-input branch computes a
        # zeroed background that it never uses.
        tokens = torch.cat([self.bg_embed.to(res.dtype), res], dim=0)          # (n+1, 20, D)
        return tokens.reshape(1, -1, self.cfg.cross_attention_dim)             # (1, 20(n+1), D)
