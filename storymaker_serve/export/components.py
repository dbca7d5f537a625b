"""The exportable components: a plain-tensor torch graph and an I/O spec for each.

Each `Component` pairs a `ComponentSpec` (runtime/spec.py) with the torch module
that is exported (`graph`) and the module its ONNX output is checked against
(`reference`, the same for all but the UNet, whose reference is the release's
unfused LoRA processors). Graph wrappers only adapt calling conventions:
- clip_vision: the vision tower truncated to the layers `hidden_states[-2]` needs
  (the last encoder layer, post-LayerNorm and projection are dropped);
- ppr: tokens for n characters, `clip_token_scale` a runtime input (identity-only);
- text_encoder(_2): penultimate hidden states (+ pooled projection for the second);
- unet: one graph with ControlNet residual inputs (zeros when no pose map: exact),
  `timestep` and `ip_scale` per sample so requests can be batched;
- controlnet: residuals already multiplied by a per-sample `conditioning_scale`;
- vae_decoder: runtime.denoise.VAEDecode, latents -> image in [0, 1] (the module every torch path decodes with).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace as NS

from torch import nn

from storymaker_serve.runtime.attention import TEXT_TOKENS
from storymaker_serve.runtime.denoise import vae_scale_factor
from storymaker_serve.runtime.spec import ComponentSpec, TensorSpec


@dataclass
class ExportProfile:
    """Shape ranges the engines accept (TensorRT profiles, Triton limits)."""

    min_size: int = 768
    opt_size: int = 1024
    max_size: int = 1536
    max_batch: int = 4            # images per UNet call (the CFG batch is twice this): in-flight batching fills it
    max_characters: int = 3

    @classmethod
    def demo(cls) -> ExportProfile:
        return cls(min_size=64, opt_size=128, max_size=256, max_batch=4, max_characters=3)


@dataclass
class Component:
    spec: ComponentSpec
    graph: nn.Module
    reference: nn.Module
    prepare_export: object | None = None   # called after the reference outputs, before export (the UNet's LoRA fuse)


def _shallow(module: nn.Module) -> nn.Module:
    """A copy sharing parameters but with its own child table: copy.copy alone shares `_modules`, so replacing a
    child of the copy would replace it in the original too."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    return out


class ClipVisionGraph(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        vm = _shallow(encoder.vision_model)             # the encoder itself stays whole (it is the parity reference)
        vm.encoder = _shallow(vm.encoder)
        vm.encoder.layers = vm.encoder.layers[:-1]          # hidden_states[-2] needs all but the last layer
        self.vm = vm

    def forward(self, pixel_values):
        return self.vm(pixel_values, output_hidden_states=True).hidden_states[-1]  # (N, 257, C)


class ClipVisionReference(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.enc = encoder

    def forward(self, pixel_values):
        return self.enc(pixel_values, output_hidden_states=True).hidden_states[-2]


class PPRGraph(nn.Module):
    def __init__(self, ppr):
        super().__init__()
        self.ppr = ppr

    def forward(self, id_embeds, clip_embeds, face_embeds, clip_token_scale):
        return self.ppr(id_embeds, clip_embeds, face_embeds, clip_token_scale)  # (1, 20(n+1), D)


class TextEncoderGraph(nn.Module):
    def __init__(self, encoder, pooled: bool):
        super().__init__()
        self.enc, self.pooled = encoder, pooled

    def forward(self, input_ids):
        out = self.enc(input_ids, output_hidden_states=True)
        return (out.hidden_states[-2], out[0]) if self.pooled else out.hidden_states[-2]


class UNetGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, ip_scale, *residuals):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         cross_attention_kwargs={"ip_scale": ip_scale},
                         down_block_additional_residuals=list(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1], return_dict=False)[0]


class ControlNetGraph(nn.Module):
    def __init__(self, controlnet):
        super().__init__()
        self.cn = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, text_embeds,
                time_ids):
        down, mid = self.cn(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                            controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                            return_dict=False)
        s = conditioning_scale.view(-1, 1, 1, 1)
        return (*[d * s for d in down], mid * s)


def residual_specs(unet_config) -> list[tuple[int, int]]:
    """(channels, downsampling) of each ControlNet residual the UNet accepts: down blocks then mid."""
    chans = unet_config.block_out_channels
    out, k = [(chans[0], 1)], 1
    for i, c in enumerate(chans):
        out += [(c, k)] * unet_config.layers_per_block
        if i < len(chans) - 1:
            k *= 2
            out.append((c, k))
    return out + [(chans[-1], k)]


def _f(name, dims, low=-1.0, high=1.0, zero_default=False):
    return TensorSpec(name, "float32", tuple(dims), low, high, zero_default)


def build_specs(m, prof: ExportProfile) -> dict[str, ComponentSpec]:
    """Specs of every torch-exported component for the loaded models `m` (StoryMakerModels)."""
    if not 1 <= prof.max_characters <= m.ppr.cfg.max_characters:
        raise ValueError(f"{prof.max_characters} characters requested; the resampler in mask.bin has "
                         f"{m.ppr.cfg.max_characters} position rows (pos_embed), so 1 to {m.ppr.cfg.max_characters}.")
    u, d, c = m.sdxl.unet.config, m.ppr.cfg.cross_attention_dim, m.ppr.cfg.clip_dim
    tpc = m.ppr.cfg.tokens_per_character
    f = vae_scale_factor(m.sdxl.vae.config)               # pixels per latent, from the VAE's config
    L = m.sdxl.tokenizer.model_max_length                 # text tokens, from the tokenizer
    if L != TEXT_TOKENS or m.sdxl.tokenizer_2.model_max_length != L:
        raise ValueError(f"tokenizers pad to {L}/{m.sdxl.tokenizer_2.model_max_length} tokens; StoryMaker's attention "
                         f"splits text from image tokens at {TEXT_TOKENS}")
    lat = lambda px: px // f
    hw = {"h": (lat(prof.min_size), lat(prof.opt_size), lat(prof.max_size))}
    hw["w"] = hw["h"]
    n2 = {"N": (1, 2, 2 * prof.max_batch)}             # 1: a request without CFG (guidance <= 1)
    s_rng = {"S": (L + 2 * tpc, L + (1 + min(2, prof.max_characters)) * tpc, L + (1 + prof.max_characters) * tpc)}
    pooled = u.projection_class_embeddings_input_dim - 6 * u.addition_time_embed_dim
    cond = [_f("text_embeds", ("N", pooled)), _f("time_ids", ("N", 6), 0.0, 1.0)]
    res = [_f(f"down_res_{i}" if i < len(residual_specs(u)) - 1 else "mid_res", ("N", ch, f"h/{k}" if k > 1 else "h",
           f"w/{k}" if k > 1 else "w"), zero_default=True) for i, (ch, k) in enumerate(residual_specs(u))]
    vocab = lambda tok: len(tok)
    te = lambda enc: enc.config.hidden_size
    specs = [
        ComponentSpec("clip_vision", (_f("pixel_values", ("N", 3, 224, 224), -1.8, 2.1),),
                      (_f("hidden_states", ("N", 257, c)),), {"N": (1, 2, 2 * prof.max_characters)}, 1e-3,
                      "CLIP ViT-H/14 vision tower up to hidden_states[-2]: last layer, post-LayerNorm and "
                      "projection dropped"),
        ComponentSpec("ppr",
                      (_f("id_embeds", ("n", 512)), _f("clip_embeds", ("n", 257, c)), _f("face_embeds", ("n", 257, c)),
                       _f("clip_token_scale", (1,), 1.0, 1.0)),
                      (_f("image_tokens", (1, "T_img", d)),),
                      {"n": (1, min(2, prof.max_characters), prof.max_characters)}, 1e-4,
                      "T_img = 20(n+1); negative tokens: the same graph on all-zero inputs; clip_token_scale 0 = "
                      "identity-only"),
        ComponentSpec("text_encoder", (TensorSpec("input_ids", "int64", ("B", L), 0, vocab(m.sdxl.tokenizer)),),
                      (_f("hidden_states", ("B", L, te(m.sdxl.text_encoder))),), {"B": (1, 2, 2)}, 1e-4),
        ComponentSpec("text_encoder_2", (TensorSpec("input_ids", "int64", ("B", L), 0, vocab(m.sdxl.tokenizer_2)),),
                      (_f("hidden_states", ("B", L, te(m.sdxl.text_encoder_2))), _f("text_embeds", ("B", pooled))),
                      {"B": (1, 2, 2)}, 1e-4),
        ComponentSpec("unet",
                      (_f("sample", ("N", 4, "h", "w")), _f("timestep", ("N",), 0.0, 999.0),
                       _f("encoder_hidden_states", ("N", "S", d)), *cond, _f("ip_scale", ("N",), 0.0, 1.0), *res),
                      (_f("noise_pred", ("N", 4, "h", "w")),), {**n2, **hw, **s_rng}, 1e-4,
                      f"LoRA fused; S = {L} + T_img; ControlNet residual inputs are zeros when no pose map is given"),
        ComponentSpec("vae_decoder", (_f("latent", ("B", 4, "h", "w"), -4.0, 4.0),),
                      (_f("image", ("B", 3, f"{f}*h", f"{f}*w")),), {"B": (1, 1, prof.max_batch), **hw}, 3e-4,
                      "float32 by default (SDXL's VAE overflows in fp16); output in [0, 1]"),
    ]
    if m.controlnet is not None:
        specs.append(ComponentSpec(
            "controlnet",
            (_f("sample", ("N", 4, "h", "w")), _f("timestep", ("N",), 0.0, 999.0),
             _f("encoder_hidden_states", ("N", L, d)), _f("controlnet_cond", ("N", 3, f"{f}*h", f"{f}*w"), 0.0, 1.0),
             _f("conditioning_scale", ("N",), 0.0, 1.0), *cond),
            tuple(TensorSpec(r.name, r.dtype, r.dims, r.low, r.high) for r in res), {**n2, **hw}, 1e-4,
            "text tokens only as context; residuals feed the unet's residual inputs"))
    return {s.name: s for s in specs}


def models_view(unet, text_widths: tuple[int, int], cross_attention_dim: int, vocab: int = 49408,
                vae_blocks: int = 4, clip_dim: int = 1280):
    """The part of StoryMakerModels that build_specs reads, for a UNet built without the other models (the
    scale check and UNet benchmarks): SDXL's tokenizers (77 tokens), text encoder widths, VAE depth and the
    release's resampler settings."""
    class Tok(list):
        model_max_length = TEXT_TOKENS

    sdxl = NS(unet=unet, tokenizer=Tok([0] * vocab), tokenizer_2=Tok([0] * vocab),
              text_encoder=NS(config=NS(hidden_size=text_widths[0])),
              text_encoder_2=NS(config=NS(hidden_size=text_widths[1])),
              vae=NS(config=NS(block_out_channels=(128,) * vae_blocks)))
    ppr = NS(cfg=NS(max_characters=3, cross_attention_dim=cross_attention_dim, clip_dim=clip_dim,
                    tokens_per_character=20))
    return NS(sdxl=sdxl, ppr=ppr, controlnet=None)
