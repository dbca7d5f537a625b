"""Test oracle: the release's own loop, a diffusers scheduler step by step, on any Denoiser.

Product code runs runtime.denoise.denoise (host-precomputed plans, runtime/schedulers.py); tests compare it against
this loop, which is how diffusers' SDXL pipeline samples: the scheduler's own scale_model_input and step with its
per-step host arithmetic, classifier-free guidance only above guidance 1, and the noise of stochastic schedulers
drawn from the pipeline's CPU generator after the starting latents."""
import inspect

import torch

from storymaker_serve.runtime.denoise import initial_latents
from storymaker_serve.runtime.schedulers import TCD_GAMMA, diffusers_scheduler


@torch.no_grad()
def diffusers_sample(denoiser, inputs: dict, opts, scheduler_config: dict, vae_factor: int = 8,
                     in_channels: int = 4) -> torch.Tensor:
    denoiser.prepare(inputs)
    sched = diffusers_scheduler(getattr(opts, "scheduler", "unipc"), scheduler_config,
                                getattr(opts, "timestep_spacing", None))
    sched.set_timesteps(opts.steps)
    g = torch.Generator("cpu").manual_seed(int(opts.seed))
    latents = initial_latents(opts.seed, opts.height, opts.width, in_channels, vae_factor, g) * sched.init_noise_sigma
    step_kwargs = {k: v for k, v in (("generator", g), ("eta", TCD_GAMMA if type(sched).__name__ == "TCDScheduler"
                                                                else 0.0))
                   if k in inspect.signature(sched.step).parameters}
    cfg = opts.guidance > 1
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        eps = denoiser(x, t.float()).float().cpu()
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + opts.guidance * (cond - uncond)
        latents = sched.step(eps, t, latents, return_dict=False, **step_kwargs)[0]
    return latents
