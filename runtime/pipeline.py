"""The reference StoryMaker pipeline: text encoding, UniPC sampling with CFG, VAE decode.

Computes what the release's SDXL StoryMaker pipeline computes (contract
"UNet attention" and "Defaults"): both SDXL text encoders' penultimate hidden
states concatenated, text_encoder_2's pooled projection, SDXL time ids; the
image tokens are appended after the 77 text tokens (negative: text negative +
zero-input image tokens); diffusers' `UniPCMultistepScheduler` from the SDXL
scheduler config; classifier-free guidance as one batch of 2; optional pose
ControlNet (text tokens only as its context, residuals added to the UNet);
VAE decode in float32. `ip_scale` reaches every decoupled cross-attention per
call. The stages are separate functions so that the served (Triton) path and
the in-process path call the same code and give the same image per seed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from runtime.errors import InputError

log = logging.getLogger(__name__)
TEXT_LEN = 77


@dataclass
class GenerateOptions:
    prompt: str
    negative_prompt: str | None = None   # None -> zero negative text embeddings (SDXL force_zeros_for_empty_prompt)
    steps: int = 25
    guidance: float = 7.5
    width: int = 1280
    height: int = 960
    seed: int = 0
    ip_scale: float = 0.8
    pose_image: np.ndarray | None = None  # uint8 RGB OpenPose map
    controlnet_scale: float = 1.0

    def validate(self, vae_factor: int = 8) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("prompt is missing or empty")
        if self.steps <= 0:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        for k in ("width", "height"):
            v = getattr(self, k)
            if v <= 0 or v % vae_factor:
                raise InputError(f"{k}={v} must be a positive multiple of {vae_factor}")
        if not np.isfinite([self.guidance, self.ip_scale, self.controlnet_scale]).all():
            raise InputError("guidance, ip_scale and controlnet_scale must be finite numbers")


@dataclass
class TextEmbeds:
    prompt_embeds: torch.Tensor   # (2, 77, D): [negative, positive]
    pooled: torch.Tensor          # (2, P)


def tokenize(tok, prompt: str) -> tuple[np.ndarray, bool]:
    """SDXL tokenisation: padded/truncated to 77 ids (int64 [1, 77]); True if the prompt was truncated."""
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids
    truncated = len(tok(prompt).input_ids) > tok.model_max_length
    if truncated:
        log.warning("prompt longer than %d tokens was truncated (as SDXL does): %.60s...", tok.model_max_length, prompt)
    return ids.astype(np.int64), truncated


@torch.no_grad()
def encode_prompt(sdxl, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [1, 77, D], pooled [1, P]) as SDXL's encode_prompt (truncation to 77 warns)."""
    hidden, pooled = [], None
    for tok, enc in ((sdxl.tokenizer, sdxl.text_encoder), (sdxl.tokenizer_2, sdxl.text_encoder_2)):
        ids, _ = tokenize(tok, prompt)
        out = enc(torch.from_numpy(ids).to(enc.device), output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]                      # text_encoder_2's projected pooled output
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def encode_text(sdxl, prompt: str, negative_prompt: str | None) -> TextEmbeds:
    pos, pos_pooled = encode_prompt(sdxl, prompt)
    if negative_prompt is None:
        neg, neg_pooled = torch.zeros_like(pos), torch.zeros_like(pos_pooled)
    else:
        neg, neg_pooled = encode_prompt(sdxl, negative_prompt)
    return TextEmbeds(torch.cat([neg, pos]), torch.cat([neg_pooled, pos_pooled]))


def make_scheduler(scheduler_config: dict):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(scheduler_config)


def initial_latents(seed: int, height: int, width: int, channels: int = 4, vae_factor: int = 8) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator("cpu").manual_seed(int(seed))
    return randn_tensor((1, channels, height // vae_factor, width // vae_factor), generator=g, dtype=torch.float32)


def pose_tensor(pose: np.ndarray, height: int, width: int) -> torch.Tensor:
    from PIL import Image

    im = Image.fromarray(pose).convert("RGB").resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)


def step_inputs(text: TextEmbeds, tokens: tuple[torch.Tensor, torch.Tensor], opts: GenerateOptions,
                device: torch.device | str = "cpu") -> dict:
    """The per-request UNet inputs that stay fixed over the loop, CFG batch [negative, positive], float32 on
    `device` (the CPU for the reference and the served engines; torch-opt builds them where the UNet runs)."""
    f32 = dict(device=device, dtype=torch.float32)
    pos_tok, neg_tok = (t.detach().to(**f32) for t in tokens)
    pe = text.prompt_embeds.detach().to(**f32)
    ehs = torch.cat([torch.cat([pe[:1], neg_tok], 1), torch.cat([pe[1:], pos_tok], 1)])    # (2, 77+T, D)
    out = {"encoder_hidden_states": ehs, "text_embeds": text.pooled.detach().to(**f32),
           "time_ids": torch.tensor([[opts.height, opts.width, 0, 0, opts.height, opts.width]] * 2, **f32),
           "ip_scale": torch.full((2,), float(opts.ip_scale), **f32), "pose": None}
    if opts.pose_image is not None:
        out["pose"] = pose_tensor(opts.pose_image, opts.height, opts.width).to(**f32).repeat(2, 1, 1, 1)  # (2,3,H,W)
        out["controlnet_scale"] = torch.full((2,), float(opts.controlnet_scale), **f32)
    return out


class TorchDenoiser:
    """eps(x, t) with the PyTorch UNet (and ControlNet when the request has a pose map)."""

    def __init__(self, unet, controlnet=None):
        self.unet, self.controlnet = unet, controlnet
        p = next(unet.parameters())
        self.dev, self.dt = p.device, p.dtype

    def prepare(self, inputs: dict) -> None:
        if inputs["pose"] is not None and self.controlnet is None:
            raise InputError("a pose image was given but no ControlNet is loaded; add controlnet/ to the weights")
        self.inp = {k: (v.to(self.dev, self.dt) if torch.is_tensor(v) else v) for k, v in inputs.items()}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = self.inp
        cond = {"text_embeds": i["text_embeds"], "time_ids": i["time_ids"]}
        x = x.to(self.dev, self.dt)
        extra = {}
        if i["pose"] is not None:
            down, mid = self.controlnet(x, t, encoder_hidden_states=i["encoder_hidden_states"][:, :TEXT_LEN],
                                        controlnet_cond=i["pose"], conditioning_scale=float(i["controlnet_scale"][0]),
                                        added_cond_kwargs=cond, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x, t, encoder_hidden_states=i["encoder_hidden_states"], added_cond_kwargs=cond,
                         cross_attention_kwargs={"ip_scale": i["ip_scale"]}, return_dict=False, **extra)[0].float()


@torch.no_grad()
def sample(denoiser, inputs: dict, opts: GenerateOptions, scheduler_config: dict, in_channels: int = 4,
           step_callback=None) -> torch.Tensor:
    """UniPC loop with CFG on any denoiser (torch or served engines); returns latents (1, 4, h, w) float32 CPU.

    `step_callback(i, n)` runs before each step and may raise to stop (cancellation)."""
    denoiser.prepare(inputs)
    sched = make_scheduler(scheduler_config)
    sched.set_timesteps(opts.steps)
    latents = initial_latents(opts.seed, opts.height, opts.width, in_channels) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        if step_callback is not None:
            step_callback(i, len(sched.timesteps))
        x = sched.scale_model_input(torch.cat([latents] * 2), t)                 # (2, 4, h, w)
        uncond, cond_eps = denoiser(x, t).float().cpu().chunk(2)
        latents = sched.step(uncond + opts.guidance * (cond_eps - uncond), t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 (H, W, 3); the VAE runs in float32 (SDXL's VAE overflows in fp16)."""
    z = latents.to(vae.device, torch.float32) / vae.config.scaling_factor
    img = vae.decode(z, return_dict=False)[0]
    return to_uint8((img / 2 + 0.5).clamp(0, 1)[0].cpu().numpy())


def to_uint8(chw01: np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1] -> uint8 (H, W, 3), rounding as diffusers' postprocess."""
    return (np.transpose(chw01, (1, 2, 0)) * 255).round().astype(np.uint8)


class StoryMakerPipeline:
    """In-process reference pipeline over loaded `StoryMakerModels`."""

    def __init__(self, models):
        self.m = models
        self.vae_factor = 2 ** (len(models.sdxl.vae.config.block_out_channels) - 1)

    def encode_characters(self, chars, identity_only: bool = False, interpolation: float | None = None):
        from runtime.characters import encode_characters

        return encode_characters(self.m, chars, identity_only, interpolation)

    def generate(self, opts: GenerateOptions, tokens, step_callback=None) -> np.ndarray:
        opts.validate(self.vae_factor)
        text = encode_text(self.m.sdxl, opts.prompt, opts.negative_prompt)
        lat = sample(TorchDenoiser(self.m.sdxl.unet, self.m.controlnet), step_inputs(text, tokens, opts), opts,
                     self.m.sdxl.scheduler_config, self.m.sdxl.unet.config.in_channels, step_callback)
        return decode(self.m.sdxl.vae, lat)
