"""The denoising core every path shares: one loop, one ControlNet branch, one decode.

A prompt becomes an image in three steps, the same for the reference, torch-opt, the build's engines in
process and the Triton BLS models:

1. `step_inputs(text, tokens, opts)`: what stays fixed over the loop (CFG batch [negative, positive]).
2. `denoise(denoiser, inputs, opts, plan, vae_factor)`: the sampling loop (UniPC by default, or any sampler of
   `runtime/schedulers.py`) with classifier-free guidance above guidance 1, over host-precomputed scalars (equal
   to diffusers' schedulers, which stay the test oracle); latents stay where the denoiser works and the loop never
   reads a value back to the host.
3. `decode(vae01, latents)`: latents -> uint8 image, through any "latents -> image in [0, 1]" function.

A `Denoiser` computes eps for the CFG batch. Its `forward` holds the one ControlNet branch (residuals when the
request has a pose map, none otherwise); the implementations only say how to run a UNet and a ControlNet:
- `TorchDenoiser`: PyTorch modules. The reference passes the release's unfused LoRA processors, eager;
  torch-opt passes the fused/compiled UNet and a `GraphedStep` (CUDA graph) as its step.
- `EngineDenoiser`: functions over numpy feeds (BLS calls to the `unet`/`controlnet` models when served, or
  onnxruntime sessions in process), or over torch tensors on the engines' device (`device`: sessions with I/O
  binding, `OrtEngine.run_bound`; the request's inputs are moved there once and latents and residuals stay there).
  Without a pose map it sends no residuals: the engine runner feeds zeros (exact), allocated once per shape; only
  a native engine (NGC repository) gets them sent.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from storymaker_serve.runtime import fused
from storymaker_serve.runtime.attention import TEXT_TOKENS
from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.schedulers import sampler_for

# Step inputs kept in float32 whatever the model precision: they feed sinusoidal embeddings (diffusers casts the
# embedding, not its argument), and bf16's 8-bit mantissa would round sizes such as 1032 in time_ids
FLOAT32_INPUTS = ("time_ids",)


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent: 2 ** (number of VAE blocks - 1), from the VAE's config (8 for SDXL)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def noise_generator(seed: int, device: str = "cpu") -> torch.Generator:
    """The generator a request's noise comes from: on the CPU by default (the same images on every host), or on the
    GPU as the StoryMaker release does (`torch.Generator(device="cuda")`: its images, on CUDA hosts only)."""
    return torch.Generator(device).manual_seed(int(seed))


def initial_latents(seed: int, height: int, width: int, channels: int, vae_factor: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The starting noise: diffusers' randn_tensor on the request's generator (a CPU one seeded with `seed` unless
    given), float32 (1, C, H/f, W/f), on the generator's device. A stochastic sampler goes on drawing its step
    noise from the same generator."""
    g = generator if generator is not None else noise_generator(seed)
    return randn_tensor((1, channels, height // vae_factor, width // vae_factor), generator=g, device=g.device,
                        dtype=torch.float32)


def pose_tensor(pose: np.ndarray, height: int, width: int) -> torch.Tensor:
    im = Image.fromarray(pose).convert("RGB").resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)


def uses_cfg(opts) -> bool:
    """Classifier-free guidance runs (a batch of 2 per step) only above guidance 1, as in diffusers; at 1 or below
    the loop runs the positive row alone, half the UNet rows."""
    return opts.guidance > 1


def step_inputs(text, tokens: tuple[torch.Tensor, torch.Tensor], opts, device: torch.device | str = "cpu") -> dict:
    """The per-request UNet inputs that stay fixed over the loop, CFG batch [negative, positive] (the positive row
    alone without CFG), float32 on `device`; `pose` and `controlnet_scale` only when the request has a pose map."""
    f32 = dict(device=device, dtype=torch.float32)
    pos_tok, neg_tok = (torch.as_tensor(np.asarray(t) if not torch.is_tensor(t) else t).detach().to(**f32)
                        for t in tokens)
    pe = text.prompt_embeds.detach().to(**f32)
    ehs = torch.cat([torch.cat([pe[:1], neg_tok], 1), torch.cat([pe[1:], pos_tok], 1)])    # (2, 77+T, D)
    out = {"encoder_hidden_states": ehs, "text_embeds": text.pooled.detach().to(**f32),
           "time_ids": torch.tensor([[opts.height, opts.width, 0, 0, opts.height, opts.width]] * 2, **f32),
           "ip_scale": torch.full((2,), float(opts.ip_scale), **f32)}
    if opts.pose_image is not None:
        out["pose"] = pose_tensor(opts.pose_image, opts.height, opts.width).to(**f32).repeat(2, 1, 1, 1)  # (2,3,H,W)
        out["controlnet_scale"] = torch.full((2,), float(opts.controlnet_scale), **f32)
    if not uses_cfg(opts):
        out = {k: v[1:] for k, v in out.items()}
    return out


class Denoiser:
    """eps(x, t) for the CFG batch. Subclasses say how to run the UNet and the ControlNet; the branch is here."""

    has_controlnet = False
    device = None                   # where the loop should keep its latents (None: the host)

    def prepare(self, inputs: dict) -> None:
        if "pose" in inputs and not self.has_controlnet:
            raise InputError("a pose map was given but this model has no ControlNet; add controlnet/ to the weights "
                             "(and rebuild the deployment)")
        self.inp = self.convert(inputs)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.forward(x, t, self.inp)

    def forward(self, x, t, inp: dict):
        """The one ControlNet branch: residuals from the pose map, or none (the UNet then adds nothing)."""
        residuals = self.controlnet(x, t, inp) if "pose" in inp else None
        return self.unet(x, t, inp, residuals)

    # ---- per implementation ----
    def convert(self, inputs: dict) -> dict:
        raise NotImplementedError

    def controlnet(self, x, t, inp: dict):
        raise NotImplementedError

    def unet(self, x, t, inp: dict, residuals):
        raise NotImplementedError


class TorchDenoiser(Denoiser):
    """PyTorch UNet (+ ControlNet). `unet_fn`: the module to call (compiled or not; default `unet`); `step`
    wraps `forward` (torch-opt's GraphedStep replays it as a CUDA graph); inputs and x in `dtype` on `device`
    (default: the UNet's), timesteps and FLOAT32_INPUTS stay float32."""

    def __init__(self, unet, controlnet=None, unet_fn=None, step=None, dtype=None, device=None):
        p = next(unet.parameters())
        self.unet_fn, self.controlnet_m = unet if unet_fn is None else unet_fn, controlnet
        self.dev, self.dt = torch.device(device or p.device), dtype or p.dtype
        self.has_controlnet = controlnet is not None
        self.step = self.forward if step is None else step

    def convert(self, inputs):
        return {k: v.to(self.dev) if k in FLOAT32_INPUTS else v.to(self.dev, self.dt) for k, v in inputs.items()}

    def __call__(self, x, t):
        return self.step(x.to(self.dt), t, self.inp).float()

    def controlnet(self, x, t, inp):
        # the ControlNet sees the text tokens only; the scale stays a device tensor (no host read)
        return self.controlnet_m(x, t, encoder_hidden_states=inp["encoder_hidden_states"][:, :TEXT_TOKENS],
                                 controlnet_cond=inp["pose"], conditioning_scale=inp["controlnet_scale"][0],
                                 added_cond_kwargs=self._cond(inp), return_dict=False)

    def unet(self, x, t, inp, residuals):
        extra = {} if residuals is None else {"down_block_additional_residuals": residuals[0],
                                              "mid_block_additional_residual": residuals[1]}
        return self.unet_fn(x, t, encoder_hidden_states=inp["encoder_hidden_states"], added_cond_kwargs=self._cond(inp),
                            cross_attention_kwargs={"ip_scale": inp["ip_scale"]}, return_dict=False, **extra)[0]

    @staticmethod
    def _cond(inp):
        return {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}


class EngineDenoiser(Denoiser):
    """UNet (+ ControlNet) as functions over feeds named as in the build's specs: numpy arrays (onnxruntime sessions
    in process, or BLS calls when served), or with `device` torch tensors on that device (sessions with I/O binding).
    `unet` is the manifest's unet record (runtime.manifest.Component)."""

    def __init__(self, unet, unet_fn, controlnet_fn=None, text_len: int = TEXT_TOKENS,
                 send_zero_residuals: bool = False,
                 device: str | None = None):
        self.device = device
        self.rec, self.unet_fn, self.controlnet_fn = unet, unet_fn, controlnet_fn
        self.has_controlnet = controlnet_fn is not None
        self.res = [t for t in unet.spec.inputs if t.name.startswith(("down_res", "mid_res"))]
        self.text_len = text_len                                  # the build's (Manifest.text_len)
        # without a pose map the residuals are zeros: the engine runner fills them (our onnxruntime sessions and
        # Python-backend models); only a native engine (NGC repository) needs them sent, once allocated per shape
        self.send_zeros = send_zero_residuals or not all(t.zero_default for t in self.res)

    def convert(self, inputs):
        self._zeros: dict = {}          # zero ControlNet residuals per latent shape, allocated once per request
        if self.device is not None:     # moved to the engines' device once per request
            return {k: v.to(self.device, torch.float32).contiguous() for k, v in inputs.items()}
        return {k: v.numpy().astype(np.float32) for k, v in inputs.items()}

    def __call__(self, x, t):
        if self.device is not None:
            return self.forward(x.to(self.device, torch.float32).contiguous(), t.to(self.device, torch.float32),
                                self.inp)
        return torch.from_numpy(self.forward(x.numpy().astype(np.float32), t.numpy(), self.inp))

    def _feeds(self, x, t, inp):
        n = x.shape[0]
        if torch.is_tensor(t):
            ts = t.reshape(1).expand(n).contiguous()
        else:
            ts = np.broadcast_to(t.astype(np.float32), (n,)).copy()
        return {"sample": x, "timestep": ts, "text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}

    def controlnet(self, x, t, inp):
        feeds = {**self._feeds(x, t, inp), "encoder_hidden_states": inp["encoder_hidden_states"][:, :self.text_len],
                 "controlnet_cond": inp["pose"], "conditioning_scale": inp["controlnet_scale"]}
        return self.controlnet_fn(feeds)

    def unet(self, x, t, inp, residuals):
        if residuals is None and not self.send_zeros:
            residuals = {}              # no pose map: the runner feeds zeros (exact: the UNet adds them)
        elif residuals is None:         # a native engine: zero residuals made here, once per latent shape
            spec = self.rec.spec
            alloc = None if self.device is None else (lambda shape: torch.zeros(shape, device=self.device))
            residuals = spec.zeros(self.res, spec.bind({"sample": tuple(x.shape)}), self._zeros, alloc)
        feeds = {**self._feeds(x, t, inp), "encoder_hidden_states": inp["encoder_hidden_states"],
                 "ip_scale": inp["ip_scale"], **residuals}
        return self.unet_fn(feeds)["noise_pred"]


@torch.no_grad()
def denoise(denoiser: Denoiser, inputs: dict, opts, plan, vae_factor: int, in_channels: int = 4,
            device: torch.device | str = "cpu", channels_last: bool = False, step_callback=None,
            on_step=None) -> torch.Tensor:
    """The one loop: the plan's sampler (runtime/schedulers.py) with classifier-free guidance above guidance 1 (a
    batch of 2: negative, positive; the positive row alone otherwise), latents float32 on `device`.

    `step_callback(i, n)` runs before each step and may raise to stop (cancellation); `on_step(i, n, x0)` after
    each step with the sampler's x0 prediction (previews; reading it on the host is the caller's choice). No host
    read happens inside the loop otherwise, so on a GPU it never synchronises (tests/test_fast.py probes it)."""
    denoiser.prepare(inputs)
    generator = noise_generator(opts.seed, getattr(opts, "noise_device", "cpu"))
    x = initial_latents(opts.seed, opts.height, opts.width, in_channels, vae_factor, generator)
    sampler = sampler_for(plan, generator, tuple(x.shape), device)     # a stochastic sampler's noise: drawn next
    x = (x * plan.init_noise_sigma).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ts = torch.tensor(plan.timesteps, device=device, dtype=torch.float32)   # float32, uploaded once
    n, cfg = len(plan.timesteps), uses_cfg(opts)
    for i in range(n):
        if step_callback is not None:
            step_callback(i, n)
        x_in = sampler.model_input(x, i)
        if cfg:
            x = sampler.guided_step(denoiser(sampler.doubled(x_in), ts[i]).float(), opts.guidance, i, x)
        else:
            x = sampler.step(denoiser(x_in, ts[i]).float(), i, x)
        if on_step is not None:
            on_step(i, n, sampler.x0)
    return x


class VAEDecode(nn.Module):
    """Latents -> image in [0, 1] (scaling factor and de-normalisation inside): the torch VAE as a "vae01" function,
    and the exported `vae_decoder` graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        p = next(self.vae.parameters())
        img = self.vae.decode(latent.to(p.device, p.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def decode(vae01, latents: torch.Tensor) -> np.ndarray:
    """The one decode: `vae01(latents)` -> (1, 3, H, W) in [0, 1] (torch VAEDecode, or the vae_decoder engine; a
    tensor or a numpy array) -> uint8 (H, W, 3), rounding as diffusers' postprocess (`(x * 255).round()` in float32,
    half to even). Non-finite pixels are refused (e.g. from hostile embeddings given to a server). The image is
    checked, scaled and rounded where it lies: on a GPU only the uint8 frame, a quarter of the bytes, comes to the
    host; on the host in one fused pass (runtime/fused.py, bit-identical to the torch ops below)."""
    img = vae01(latents)
    img = (img.detach() if torch.is_tensor(img) else torch.from_numpy(np.asarray(img, np.float32)))[0].float()
    done = fused.to_uint8(img)              # on the host: (frame, non-finite count) in one pass, bit-identical
    if (done[1] if done is not None else not bool(torch.isfinite(img.sum()))):
        raise InputError("the VAE produced non-finite pixels (check the embeddings given)")
    if done is not None:
        return done[0]
    hwc = torch.empty((img.shape[1], img.shape[2], img.shape[0]), device=img.device)
    torch.mul(img.permute(1, 2, 0), 255, out=hwc)               # transposed while scaled: one pass, HWC contiguous
    return hwc.round_().to(torch.uint8).cpu().numpy()


def engine_vae01(vae_fn):
    """A vae_decoder engine (numpy feeds) as a vae01 function."""
    return lambda latents: vae_fn({"latent": latents.numpy().astype(np.float32)})["image"]


__all__ = ["Denoiser", "TorchDenoiser", "EngineDenoiser", "denoise", "decode", "VAEDecode", "engine_vae01",
           "step_inputs", "initial_latents", "vae_scale_factor", "pose_tensor", "uses_cfg",
           "noise_generator"]
