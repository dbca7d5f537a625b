"""Test oracle: the release's own loop, diffusers' UniPCMultistepScheduler step by step, on any Denoiser.

Product code runs runtime.denoise.denoise (host-precomputed UniPC); tests compare it against this loop, which
is how the release samples (scheduler.step with its per-step host arithmetic)."""
import torch

from storymaker_serve.runtime.denoise import initial_latents


@torch.no_grad()
def diffusers_sample(denoiser, inputs: dict, opts, scheduler_config: dict, vae_factor: int = 8,
                     in_channels: int = 4) -> torch.Tensor:
    from diffusers import UniPCMultistepScheduler

    denoiser.prepare(inputs)
    sched = UniPCMultistepScheduler.from_config(scheduler_config)
    sched.set_timesteps(opts.steps)
    latents = initial_latents(opts.seed, opts.height, opts.width, in_channels, vae_factor) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = denoiser(x, t.float()).float().cpu().chunk(2)
        latents = sched.step(uncond + opts.guidance * (cond - uncond), t, latents, return_dict=False)[0]
    return latents
