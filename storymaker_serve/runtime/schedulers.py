"""Samplers as host-precomputed plans: every scalar of a run is computed once per (scheduler, config, steps,
spacing) on the host, so the loop only does tensor arithmetic and a GPU stream never waits on the host.

| name | diffusers scheduler (the oracle) | notes |
| --- | --- | --- |
| `unipc` | UniPCMultistepScheduler | the release's; runtime/unipc.py (fused host kernel on the CPU) |
| `dpmpp-2m` | DPMSolverMultistepScheduler | dpmsolver++, order 2, midpoint |
| `dpmpp-2m-karras` | DPMSolverMultistepScheduler | the same on Karras sigmas |
| `euler` | EulerDiscreteScheduler | |
| `euler-a` | EulerAncestralDiscreteScheduler | noise every step |
| `ddim` | DDIMScheduler | eta 0, no sample clipping (SDXL's setting) |
| `lcm` | LCMScheduler | noise every step but the last; LCM-LoRA, DMD2 |
| `tcd` | TCDScheduler | gamma (eta) 0.3, noise every step but the last; TCD and Hyper-SD LoRAs |

Each step applies diffusers' own tensor expressions in diffusers' order with the scalars diffusers computes
(float32, on 0-d tensors, read once with `.item()`), so a plan's run equals diffusers' run to float32 rounding
(tests/test_schedulers.py runs both over 1-25 steps). Samplers that add noise draw it from the request's CPU
generator right after the starting latents, in the order and shapes diffusers draws it, so a seed gives
diffusers' images. `timestep_spacing` (`leading`, `trailing`, `linspace`) overrides the config's where the
scheduler has one (not `lcm`, `tcd`: their timesteps come from their distillation schedule).
"""
from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.sampler_names import SCHEDULERS, SPACINGS
from storymaker_serve.runtime.unipc import UniPCPlan, UniPCSampler

TCD_GAMMA = 0.3
DIFFUSERS = {"unipc": UniPCMultistepScheduler, "dpmpp-2m": DPMSolverMultistepScheduler,
             "dpmpp-2m-karras": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
             "euler-a": EulerAncestralDiscreteScheduler, "ddim": DDIMScheduler, "lcm": LCMScheduler,
             "tcd": TCDScheduler}


def check_name(scheduler: str, spacing: str | None = None) -> None:
    if scheduler not in SCHEDULERS:
        raise InputError(f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if spacing is not None and spacing not in SPACINGS:
        raise InputError(f"timestep spacing {spacing!r} is not one of {', '.join(SPACINGS)}")


def diffusers_scheduler(name: str, config: dict, spacing: str | None = None):
    """The diffusers scheduler a plan reproduces, configured as the plan is (the test oracle uses this too)."""
    check_name(name, spacing)
    over = {"timestep_spacing": spacing} if spacing and name not in ("lcm", "tcd") else {}
    if name.startswith("dpmpp"):
        over.update(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                    use_karras_sigmas=name.endswith("karras"))
    if name in ("ddim", "lcm", "tcd"):
        over.update(clip_sample=False, thresholding=False)
    return DIFFUSERS[name].from_config(config, **over)


def make_plan(name: str, config: dict, steps: int, spacing: str | None = None):
    """The plan of scheduler `name` over `steps` for a model's scheduler config."""
    check_name(name, spacing)
    if name == "unipc":
        return UniPCPlan({**config, **({"timestep_spacing": spacing} if spacing else {})}, steps)
    sched = diffusers_scheduler(name, config, spacing)
    cfg = sched.config
    if cfg.prediction_type != "epsilon":
        raise InputError(f"scheduler {name}: the model predicts {cfg.prediction_type}; the plans cover epsilon "
                         "prediction (SDXL's)")
    sched.set_timesteps(steps)
    return PLANS[name.removesuffix("-karras")](sched)


class Plan:
    """timesteps (what the UNet sees), init_noise_sigma, per-step model-input divisors and update scalars."""

    noise_steps: tuple[int, ...] = ()          # steps that add fresh noise

    def __init__(self, sched):
        self.timesteps = [float(t) for t in sched.timesteps]
        self.init_noise_sigma = float(sched.init_noise_sigma)
        self.input_div = [1.0] * len(self.timesteps)

    def sampler(self, generator: torch.Generator | None = None, shape=None, device="cpu") -> PlanSampler:
        """A sampler for one run; the noise it adds is drawn now from `generator` (after the starting latents)."""
        noise = {i: randn_tensor(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
                 for i in self.noise_steps}
        return PlanSampler(self, noise)

    def step(self, eps, i, x, noise):
        raise NotImplementedError


class PlanSampler:
    """Per-run state over a Plan: `x = sampler.guided_step(eps2, guidance, i, x)`; `x0` is the last x0 prediction."""

    def __init__(self, plan: Plan, noise: dict):
        self.plan, self.noise, self.state, self.x0 = plan, noise, {}, None

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        d = self.plan.input_div[i]
        return x if d == 1.0 else x / d

    def doubled(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x])

    def guided_step(self, eps2: torch.Tensor, guidance: float, i: int, x: torch.Tensor) -> torch.Tensor:
        uncond, cond = eps2.chunk(2)
        return self.step(uncond + guidance * (cond - uncond), i, x)

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        x, self.x0 = self.plan.step(eps, i, x, self.noise.get(i), self.state)
        return x


class EulerPlan(Plan):
    def __init__(self, sched):
        super().__init__(sched)
        s = sched.sigmas
        self.sigma = [s[i].item() for i in range(len(self.timesteps))]
        self.input_div = [((s[i] ** 2 + 1) ** 0.5).item() for i in range(len(self.timesteps))]
        self.dt = [(s[i + 1] - s[i] * (0.0 + 1)).item() for i in range(len(self.timesteps))]

    def step(self, eps, i, x, noise, state):
        x = x.to(torch.float32)
        x0 = x - self.sigma[i] * eps
        derivative = (x - x0) / self.sigma[i]
        return x + derivative * self.dt[i], x0


class EulerAncestralPlan(EulerPlan):
    def __init__(self, sched):
        super().__init__(sched)
        s, n = sched.sigmas, len(self.timesteps)
        up = [(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5 for i in range(n)]
        self.up = [u.item() for u in up]
        self.dt = [((s[i + 1] ** 2 - up[i] ** 2) ** 0.5 - s[i]).item() for i in range(n)]
        self.noise_steps = tuple(range(n))

    def step(self, eps, i, x, noise, state):
        x, x0 = super().step(eps, i, x, noise, state)
        return x + noise * self.up[i], x0


class DPMPlan(Plan):
    """dpmsolver++ 2M (midpoint): first order on the first and the last step (final sigma 0), second otherwise."""

    def __init__(self, sched):
        super().__init__(sched)
        n, s = len(self.timesteps), sched.sigmas
        conv = [sched._sigma_to_alpha_sigma_t(s[i]) for i in range(n + 1)]           # (alpha, sigma) per sigma
        lam = [torch.log(a) - torch.log(sg) for a, sg in conv]
        self.convert = [(conv[i][1].item(), conv[i][0].item()) for i in range(n)]
        self.coef = []
        for i in range(n):
            (alpha_t, sigma_t), (_, sigma_s0) = conv[i + 1], conv[i]
            h = lam[i + 1] - lam[i]
            first = i == 0 or i == n - 1 or sched.config.solver_order == 1
            b = alpha_t * (torch.exp(-h) - 1.0)
            if first:
                self.coef.append(((sigma_t / sigma_s0).item(), b.item(), None, None))
            else:
                r0 = (lam[i] - lam[i - 1]) / h
                self.coef.append(((sigma_t / sigma_s0).item(), b.item(), (0.5 * b).item(), (1.0 / r0).item()))

    def step(self, eps, i, x, noise, state):
        sigma, alpha = self.convert[i]
        x = x.to(torch.float32)
        m0 = (x - sigma * eps) / alpha
        a, b, c, inv_r0 = self.coef[i]
        if c is None:
            out = a * x - b * m0
        else:
            d1 = inv_r0 * (m0 - state["m"])
            out = a * x - b * m0 - c * d1
        state["m"] = m0
        return out, m0


class DDIMPlan(Plan):
    """eta 0: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""

    def __init__(self, sched):
        super().__init__(sched)
        ac, self.coef = sched.alphas_cumprod, []
        for t in sched.timesteps:
            prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
            a_t = ac[t]
            a_prev = ac[prev] if prev >= 0 else sched.final_alpha_cumprod
            std = 0.0 * sched._get_variance(t, prev) ** 0.5
            self.coef.append((((1 - a_t) ** 0.5).item(), (a_t ** 0.5).item(),
                              ((1 - a_prev - std ** 2) ** 0.5).item(), (a_prev ** 0.5).item()))

    def step(self, eps, i, x, noise, state):
        sb, sa, c_dir, c_prev = self.coef[i]
        x0 = (x - sb * eps) / sa
        return c_prev * x0 + c_dir * eps, x0


class LCMPlan(Plan):
    def __init__(self, sched):
        super().__init__(sched)
        ac, ts, n, self.coef = sched.alphas_cumprod, sched.timesteps, len(self.timesteps), []
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < n else t
            a_t = ac[t]
            a_prev = ac[prev] if prev >= 0 else sched.final_alpha_cumprod
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
            self.coef.append(((1 - a_t).sqrt().item(), a_t.sqrt().item(), float(c_out), float(c_skip),
                              a_prev.sqrt().item(), (1 - a_prev).sqrt().item()))
        self.noise_steps = tuple(range(n - 1))

    def step(self, eps, i, x, noise, state):
        sb, sa, c_out, c_skip, s_prev, n_prev = self.coef[i]
        x0 = (x - sb * eps) / sa
        denoised = c_out * x0 + c_skip * x
        if noise is None:
            return denoised, denoised
        return s_prev * denoised + n_prev * noise, denoised


class TCDPlan(Plan):
    def __init__(self, sched, gamma: float = TCD_GAMMA):
        super().__init__(sched)
        ac, ts, n, self.coef = sched.alphas_cumprod, sched.timesteps, len(self.timesteps), []
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < n else torch.tensor(0)
            s = torch.floor((1 - gamma) * prev).to(dtype=torch.long)
            a_t, a_s = ac[t], ac[s]
            a_prev = ac[prev] if prev >= 0 else sched.final_alpha_cumprod
            self.coef.append(((1 - a_t).sqrt().item(), a_t.sqrt().item(), a_s.sqrt().item(), (1 - a_s).sqrt().item(),
                              (a_prev / a_s).sqrt().item(), (1 - a_prev / a_s).sqrt().item()))
        self.noise_steps = tuple(range(n - 1)) if gamma > 0 else ()

    def step(self, eps, i, x, noise, state):
        sb, sa, s_s, n_s, c_keep, c_noise = self.coef[i]
        x0 = (x - sb * eps) / sa
        noised = s_s * x0 + n_s * eps
        if noise is None:
            return noised, x0
        return c_keep * noised + c_noise * noise, x0


PLANS = {"dpmpp-2m": DPMPlan, "euler": EulerPlan, "euler-a": EulerAncestralPlan, "ddim": DDIMPlan, "lcm": LCMPlan,
         "tcd": TCDPlan}


def cached_plan(cache: dict, config: dict, opts):
    """`make_plan` for a request's options, made once per (scheduler, steps, spacing) in `cache`."""
    key = (opts.scheduler, opts.steps, opts.timestep_spacing)
    if key not in cache:
        cache[key] = make_plan(opts.scheduler, config, opts.steps, opts.timestep_spacing)
    return cache[key]


def sampler_for(plan, generator: torch.Generator, shape, device="cpu"):
    """The per-run sampler of any plan (UniPC's keeps its fused host kernel)."""
    if isinstance(plan, UniPCPlan):
        return UniPCSampler(plan)
    return plan.sampler(generator, shape, device)
