"""The reference StoryMaker pipeline: text encoding, UniPC sampling with CFG, VAE decode.

Computes what the release's SDXL StoryMaker pipeline computes (contract
"UNet attention" and "Defaults"): both SDXL text encoders' penultimate hidden
states concatenated, text_encoder_2's pooled projection, SDXL time ids; the
image tokens are appended after the 77 text tokens (negative: text negative +
zero-input image tokens); UniPC from the SDXL scheduler config (runtime/unipc.py:
the numbers of diffusers' `UniPCMultistepScheduler`, which tests keep as the
oracle); classifier-free guidance as one batch of 2; optional pose ControlNet
(text tokens only as its context, residuals added to the UNet); VAE decode in
float32. `ip_scale` reaches every decoupled cross-attention per call. The loop,
the ControlNet branch and the decode are runtime/denoise.py's, shared with
torch-opt, the in-process engines and the served (Triton) path.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from storymaker_serve.runtime.characters import encode_characters
from storymaker_serve.runtime.denoise import TorchDenoiser, VAEDecode, decode, denoise, step_inputs, vae_scale_factor
from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.schedulers import cached_plan, check_name

log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1


@dataclass
class GenerateOptions:
    prompt: str
    negative_prompt: str | None = None   # None -> zero negative text embeddings (SDXL force_zeros_for_empty_prompt)
    steps: int = 25
    guidance: float = 7.5
    width: int = 960                     # the release's portrait frame: width 960, height 1280
    height: int = 1280
    seed: int = 0
    ip_scale: float = 0.8
    pose_image: np.ndarray | None = None  # uint8 RGB OpenPose map
    controlnet_scale: float = 1.0
    scheduler: str = "unipc"             # runtime/schedulers.py: SCHEDULERS
    timestep_spacing: str | None = None  # leading, trailing or linspace; None: the scheduler config's
    noise_device: str = "cpu"            # where the seed's noise is drawn: cpu (portable) or cuda (the release's)

    def validate(self, vae_factor: int = 8) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("prompt is missing or empty")
        if self.steps <= 0:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        for k in ("width", "height"):
            v = getattr(self, k)
            if v <= 0 or v % vae_factor:
                raise InputError(f"{k}={v} must be a positive multiple of {vae_factor}")
        check_name(self.scheduler, self.timestep_spacing)
        if self.noise_device not in ("cpu", "cuda"):
            raise InputError(f"noise_device {self.noise_device!r}: use cpu (the same images on every host) or cuda "
                             "(the release's images: it draws its starting noise on the GPU)")
        if self.noise_device == "cuda" and not torch.cuda.is_available():
            raise InputError("noise_device cuda needs a CUDA GPU on the host that runs the loop; use cpu")
        if not np.isfinite([self.guidance, self.ip_scale, self.controlnet_scale]).all():
            raise InputError("guidance, ip_scale and controlnet_scale must be finite numbers")
        if not 0 <= int(self.seed) <= MAX_SEED:
            raise InputError(f"seed={self.seed} must be 0..{MAX_SEED}: the generator that draws the starting noise "
                             "uses 32 bits, so larger seeds would repeat images")


@dataclass
class TextEmbeds:
    prompt_embeds: torch.Tensor   # (2, 77, D): [negative, positive]
    pooled: torch.Tensor          # (2, P)


def tokenize(tok, prompt: str) -> tuple[np.ndarray, bool]:
    """SDXL tokenisation: padded/truncated to 77 ids (int64 [1, 77]); True if the prompt was truncated."""
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="np").input_ids
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


class StoryMakerPipeline:
    """In-process reference pipeline over loaded `StoryMakerModels`: the release's computation (unfused LoRA
    processors where the models were loaded so, eager, float32 VAE) through the shared core in runtime/denoise.py."""

    def __init__(self, models):
        self.m = models
        self.vae_factor = vae_scale_factor(models.sdxl.vae.config)
        self.plans: dict[tuple, object] = {}

    def encode_characters(self, chars, identity_only: bool = False, interpolation: float | None = None):
        return encode_characters(self.m, chars, identity_only, interpolation)

    def plan(self, opts: GenerateOptions):
        """The sampler plan of a request (runtime/schedulers.py), made once per scheduler, steps and spacing."""
        return cached_plan(self.plans, self.m.sdxl.scheduler_config, opts)

    def latents(self, opts: GenerateOptions, text: TextEmbeds, tokens, step_callback=None) -> torch.Tensor:
        unet = self.m.sdxl.unet
        return denoise(TorchDenoiser(unet, self.m.controlnet), step_inputs(text, tokens, opts), opts,
                       self.plan(opts), self.vae_factor, unet.config.in_channels,
                       device=next(unet.parameters()).device,
                       step_callback=step_callback)

    def generate(self, opts: GenerateOptions, tokens, step_callback=None) -> np.ndarray:
        opts.validate(self.vae_factor)
        text = encode_text(self.m.sdxl, opts.prompt, opts.negative_prompt)
        return decode(VAEDecode(self.m.sdxl.vae), self.latents(opts, text, tokens, step_callback))
