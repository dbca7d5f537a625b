"""(c) The resampler equals a direct re-computation of the contract's formulas for 1, 2 and 3 characters."""

import pytest
import torch
import torch.nn.functional as F

from storymaker_serve.runtime.loaders import load_mask_bin, load_ppr


def ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])


def lin(x, sd, p, bias=True):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias") if bias else None)


def perceiver_attention(x, lat, sd, p, dim_head=64):
    x, lat = ln(x, sd, p + ".norm1"), ln(lat, sd, p + ".norm2")
    q = lat @ sd[p + ".to_q.weight"].T
    kv = torch.cat([x, lat], 1) @ sd[p + ".to_kv.weight"].T
    k, v = kv.chunk(2, -1)
    heads = q.shape[-1] // dim_head
    sp = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim_head).permute(0, 2, 1, 3)
    q, k, v = sp(q), sp(k), sp(v)
    w = torch.softmax((q * dim_head ** -0.25) @ (k * dim_head ** -0.25).transpose(-1, -2), -1)
    o = (w @ v).permute(0, 2, 1, 3).reshape(lat.shape[0], lat.shape[1], -1)
    return o @ sd[p + ".to_out.weight"].T


def feed_forward(x, sd, p):
    h = ln(x, sd, p + ".0")
    return F.gelu(h @ sd[p + ".1.weight"].T) @ sd[p + ".3.weight"].T


def perceiver_stack(x, lat, sd, p):
    x = lin(x, sd, p + ".proj_in")
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(p + ".layers."))
    for i in range(depth):
        lat = perceiver_attention(x, lat, sd, f"{p}.layers.{i}.0") + lat
        lat = feed_forward(lat, sd, f"{p}.layers.{i}.1") + lat
    return ln(lin(lat, sd, p + ".proj_out"), sd, p + ".norm_out")


def formulas(sd, idv, clip, face):
    n, d = idv.shape[0], sd["norm.weight"].shape[0]
    x = lin(F.gelu(lin(idv, sd, "proj.0")), sd, "proj.2").reshape(n, -1, d)
    x = ln(x, sd, "norm")
    out = x + perceiver_stack(face, x, sd, "perceiver_resampler")
    clip_tok = perceiver_stack(clip, sd["resample.latents"].repeat(n, 1, 1), sd, "resample")
    cat = torch.cat([out, clip_tok], 1) + sd["pos_embed"][:n]
    res = ln(lin(cat, sd, "proj_out"), sd, "norm_out") + cat
    return torch.cat([sd["bg_embed"], res], 0).reshape(1, -1, d)


@pytest.fixture(scope="module")
def ppr_and_sd(bundle):
    sd, _ = load_mask_bin(bundle / "mask.bin")
    return load_ppr(sd), sd


@pytest.mark.parametrize("n", [1, 2, 3])
def test_resampler_matches_formulas(ppr_and_sd, n):
    ppr, sd = ppr_and_sd
    g = torch.Generator().manual_seed(n)
    c = ppr.cfg.clip_dim
    idv = torch.randn(n, 512, generator=g)
    clip, face = torch.randn(n, 257, c, generator=g), torch.randn(n, 257, c, generator=g)
    with torch.no_grad():
        got = ppr(idv, clip, face)
    want = formulas(sd, idv, clip, face)
    assert got.shape == (1, 20 * (n + 1), ppr.cfg.cross_attention_dim)
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err


def test_negative_tokens_keep_bg_embed(ppr_and_sd):
    """Release quirk: bg_embed is prepended also for the all-zero negative input."""
    ppr, sd = ppr_and_sd
    z = [torch.zeros(2, 512), torch.zeros(2, 257, ppr.cfg.clip_dim), torch.zeros(2, 257, ppr.cfg.clip_dim)]
    with torch.no_grad():
        neg = ppr(*z)
    assert torch.equal(neg[0, :20], sd["bg_embed"][0])
    assert neg[0, 20:].abs().sum() > 0


def test_identity_only_zeroes_character_tokens(ppr_and_sd):
    ppr, _ = ppr_and_sd
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 512, generator=g), torch.randn(1, 257, ppr.cfg.clip_dim, generator=g),
            torch.randn(1, 257, ppr.cfg.clip_dim, generator=g))
    with torch.no_grad():
        full, ident = ppr(*args), ppr(*args, clip_token_scale=0.0)
        other_clip = ppr(args[0], torch.randn(1, 257, ppr.cfg.clip_dim, generator=g), args[2], clip_token_scale=0.0)
    assert not torch.allclose(full, ident)
    assert torch.equal(ident, other_clip)  # the character image no longer matters


def test_four_characters_rejected(ppr_and_sd):
    ppr, _ = ppr_and_sd
    c = ppr.cfg.clip_dim
    with pytest.raises(ValueError, match="4 characters.*1 to 3"):
        ppr(torch.zeros(4, 512), torch.zeros(4, 257, c), torch.zeros(4, 257, c))
