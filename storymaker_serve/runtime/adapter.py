"""Attach StoryMaker's `ip_adapter` weights to a diffusers UNet, unfused or LoRA-fused.

The checkpoint's `ip_adapter` dict is the state dict of
`torch.nn.ModuleList(unet.attn_processors.values())`: keys `"{i}.to_q_lora.down.weight"`
etc., i enumerating diffusers' `attn_processors` order (140 processors for
SDXL). This module derives the expected layout from any UNet (also one built on
the meta device), validates a checkpoint against it with errors that name the
key, the expected shape and the fix, installs the reference (unfused LoRA)
processors, and fuses LoRA exactly (`W' = W + lora_scale * up @ down`, computed
in float64) so that the result is a plain diffusers UNet plus `to_k_ip/to_v_ip`
per cross-attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from storymaker_serve.runtime.attention import StoryMakerAttnProcessor
from storymaker_serve.runtime.errors import WeightsError

LORA_TARGETS = (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0"))


@dataclass(frozen=True)
class ProcessorSlot:
    index: int
    name: str                 # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    hidden_size: int
    context_dim: int          # == hidden_size for self-attention
    cross: bool


def processor_slots(unet) -> list[ProcessorSlot]:
    """The UNet's attention processors in diffusers' `attn_processors` order (the checkpoint's index)."""
    modules = dict(unet.named_modules())
    slots = []
    for i, name in enumerate(unet.attn_processors.keys()):
        attn = modules[name[: -len(".processor")]]
        cross = not name.endswith("attn1.processor")
        slots.append(ProcessorSlot(i, name, attn.to_q.out_features, attn.to_k.in_features, cross))
    return slots


def expected_layout(unet, rank: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the `ip_adapter` state dict the release writes for this UNet."""
    layout: dict[str, tuple[int, ...]] = {}
    for s in processor_slots(unet):
        for lora, _ in LORA_TARGETS:
            fin = s.context_dim if lora in ("to_k_lora", "to_v_lora") else s.hidden_size
            layout[f"{s.index}.{lora}.down.weight"] = (rank, fin)
            layout[f"{s.index}.{lora}.up.weight"] = (s.hidden_size, rank)
        if s.cross:
            layout[f"{s.index}.to_k_ip.weight"] = (s.hidden_size, s.context_dim)
            layout[f"{s.index}.to_v_ip.weight"] = (s.hidden_size, s.context_dim)
    return layout


def check_state_dict(sd: dict, expected: dict[str, tuple[int, ...]], source: str, what: str) -> None:
    """Raise WeightsError naming the first missing/unexpected/mis-shaped keys of `sd`."""
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    bad = [(k, tuple(sd[k].shape), expected[k]) for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if not (missing or extra or bad):
        return
    lines = [f"{source}: `{what}` does not match the model it is loaded into."]
    if missing:
        lines.append(f"  {len(missing)} missing keys, e.g. " + ", ".join(f"{k} {expected[k]}" for k in missing[:3]))
    if extra:
        lines.append(f"  {len(extra)} unexpected keys, e.g. " + ", ".join(extra[:3]))
    if bad:
        lines.append("  shape mismatches, e.g. " + ", ".join(f"{k}: got {g}, expected {e}" for k, g, e in bad[:3]))
    lines.append("  Check that the adapter was trained for this base model (SDXL, same cross_attention_dim) "
                 "and that the file is a StoryMaker/IP-Adapter checkpoint, not a different adapter.")
    raise WeightsError("\n".join(lines))


def lora_rank(ip_sd: dict, source: str = "mask.bin") -> int:
    try:
        return int(ip_sd["0.to_q_lora.down.weight"].shape[0])
    except KeyError:
        raise WeightsError(f"{source}: `ip_adapter` has no key '0.to_q_lora.down.weight'; cannot read the LoRA "
                           "rank. Is this a StoryMaker mask.bin (IP-Adapter without LoRA is not supported)?") from None


def build_processors(unet, rank: int, lora_scale: float, ip_scale: float) -> dict[str, StoryMakerAttnProcessor]:
    procs = {}
    for s in processor_slots(unet):
        p = StoryMakerAttnProcessor(s.hidden_size, s.context_dim if s.cross else None, rank=rank, ip=s.cross,
                                    lora_scale=lora_scale, ip_scale=ip_scale)
        procs[s.name] = p
    return procs


def attach_storymaker(unet, ip_sd: dict, *, lora_scale: float = 0.8, ip_scale: float = 0.8, fuse: bool = True,
                      source: str = "mask.bin"):
    """Install StoryMaker attention on `unet` (in place) and return it.

    fuse=False: the release's processors (LoRA applied at run time). fuse=True: LoRA folded into
    to_q/to_k/to_v/to_out.0 and processors keep only the image branch.
    """
    rank = lora_rank(ip_sd, source)
    check_state_dict(ip_sd, expected_layout(unet, rank), source, "ip_adapter")
    procs = build_processors(unet, rank, lora_scale, ip_scale)
    p = next(unet.parameters())
    holder = nn.ModuleList(procs.values()).to(device=p.device, dtype=p.dtype)
    holder.load_state_dict(ip_sd, strict=True)
    if fuse:
        procs = fuse_lora(unet, procs, lora_scale)
    unet.set_attn_processor(procs)
    return unet


@torch.no_grad()
def fuse_lora(unet, procs: dict[str, StoryMakerAttnProcessor], lora_scale: float) -> dict[str, StoryMakerAttnProcessor]:
    """Fold each processor's LoRA into the attention Linears; return LoRA-free processors."""
    modules = dict(unet.named_modules())
    fused = {}
    for name, p in procs.items():
        attn = modules[name[: -len(".processor")]]
        for lora_name, target in LORA_TARGETS:
            lin = attn.get_submodule(target)
            lora = getattr(p, lora_name)
            delta = lora.up.weight.double() @ lora.down.weight.double()               # (out, in)
            lin.weight.copy_((lin.weight.double() + lora_scale * delta).to(lin.weight.dtype))
        fused[name] = StoryMakerAttnProcessor.from_processor(p, drop_lora=True)
    return fused


def set_ip_scale(unet, ip_scale: float) -> None:
    for p in unet.attn_processors.values():
        if isinstance(p, StoryMakerAttnProcessor):
            p.ip_scale = ip_scale
