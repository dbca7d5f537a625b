"""UniPC multistep sampling with every scalar precomputed on the host (no GPU->CPU syncs per step).

Same algorithm and numbers as diffusers' `UniPCMultistepScheduler` (UniPC,
Zhao et al. 2023: bh2 predictor-corrector, x0-prediction, solver order 2,
lower-order warm-up and final steps) for epsilon-prediction models. diffusers
computes per step, on the device, sigma->alpha conversions, logs, `expm1`, a
small `linalg.solve`, and looks the step index up by comparing timesteps; each
of those is a scalar that only depends on the schedule. `UniPCPlan` computes
them once per (config, steps) with diffusers' own float32 arithmetic on the
CPU and keeps them as Python floats; `UniPCSampler.step` then only does tensor
arithmetic in diffusers' expression order, so results agree to ~1e-7 and a
CUDA stream never waits on the host. Parity: tests/test_unipc.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UniPCMultistepScheduler

from storymaker_serve.runtime import fused


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


@dataclass
class Update:
    """x_t = a * x - b * m0 - c * (sum_k rho_k (m_k - m0) / r_k  [+ rho_t * (m_t - m0)])."""
    a: float
    b: float
    c: float
    rks: list[float]      # r_k of the older model outputs m_1.. (newest first)
    rhos: list[float]     # weights of those; for the corrector the last one weighs (m_t - m0)


def _update(sig_t: torch.Tensor, sig_s0: torch.Tensor, older: list[torch.Tensor], order: int,
            corrector: bool) -> Update:
    """Scalars of one predictor/corrector update, computed exactly as diffusers does (float32)."""
    alpha_t, sigma_t = _alpha_sigma(sig_t)
    alpha_s0, sigma_s0 = _alpha_sigma(sig_s0)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    rks = []
    for s in older[: order - 1]:
        alpha_si, sigma_si = _alpha_sigma(s)
        rks.append((torch.log(alpha_si) - torch.log(sigma_si) - lambda_s0) / h)
    r_all = torch.stack(rks + [torch.ones(())])
    hh = -h                                               # predict_x0
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i, R, b = 1, [], []
    B_h = torch.expm1(hh)                                 # bh2
    for i in range(1, order + 1):
        R.append(torch.pow(r_all, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R, b = torch.stack(R), torch.stack(b)
    if corrector:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    elif rks:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    else:
        rhos = []
    return Update((sigma_t / sigma_s0).item(), (alpha_t * h_phi_1).item(), (alpha_t * B_h).item(),
                  [r.item() for r in rks], rhos)


class UniPCPlan:
    """Host-side schedule: timesteps, conversion scalars, and predictor/corrector scalars per step."""

    def __init__(self, scheduler_config: dict, steps: int):
        sched = UniPCMultistepScheduler.from_config(scheduler_config)
        cfg = sched.config
        if (cfg.prediction_type, cfg.predict_x0, cfg.solver_type, cfg.thresholding, list(cfg.disable_corrector)) != \
                ("epsilon", True, "bh2", False, []):
            raise NotImplementedError("UniPCPlan covers epsilon prediction, predict_x0, bh2, no thresholding, "
                                      "corrector on every step (the SDXL/StoryMaker setting); use diffusers otherwise")
        sched.set_timesteps(steps)
        self.timesteps = sched.timesteps.tolist()
        self.init_noise_sigma = float(sched.init_noise_sigma)
        sig = sched.sigmas                                # float32, len steps + 1
        n, order = len(self.timesteps), cfg.solver_order
        self.solver_order = order
        self.convert = [(_alpha_sigma(sig[i])[1].item(), _alpha_sigma(sig[i])[0].item()) for i in range(n)]
        self.orders, lower = [], 0
        for i in range(n):
            o = min(order, n - i) if cfg.lower_order_final else order
            self.orders.append(min(o, lower + 1))
            lower = min(lower + 1, order)
        self.pred = [_update(sig[i + 1], sig[i], [sig[i - k] for k in range(1, self.orders[i])], self.orders[i], False)
                     for i in range(n)]
        self.corr = [None] + [_update(sig[i], sig[i - 1], [sig[i - 1 - k] for k in range(1, self.orders[i - 1])],
                                      self.orders[i - 1], True) for i in range(1, n)]


class UniPCSampler:
    """Stateful per-request stepping over a UniPCPlan: `x = sampler.step(eps, i, x)`; tensors stay on device."""

    def __init__(self, plan: UniPCPlan):
        self.plan = plan
        self.ms: list[torch.Tensor] = []                  # converted model outputs, newest last
        self.last: torch.Tensor | None = None
        self.pair: tuple | None = None                    # (sample returned, [sample, sample]) from the fused step

    @property
    def x0(self) -> torch.Tensor:
        """The last x0 prediction (previews)."""
        return self.ms[-1]

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x                                          # UniPC does not scale the model input

    def doubled(self, x: torch.Tensor) -> torch.Tensor:
        """torch.cat([x, x]), the CFG batch of a sample: the one the fused step already wrote if x is its result."""
        if self.pair is not None and self.pair[0] is x:
            return self.pair[1]
        return torch.cat([x, x])

    def guided_step(self, eps2: torch.Tensor, guidance: float, i: int, sample: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance, then `step`: eps2 holds the [uncond, cond] rows. On the host, one fused pass
        (runtime/fused.py, bit-identical); elsewhere the torch ops."""
        out = fused.unipc_step(self, eps2, guidance, i, sample)
        if out is not None:
            return out
        uncond, cond = eps2.chunk(2)
        return self.step(uncond + guidance * (cond - uncond), i, sample)

    def step(self, eps: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        p = self.plan
        sigma, alpha = p.convert[i]
        m = (sample - sigma * eps) / alpha                # x0 prediction
        if i > 0 and self.last is not None:               # corrector (UniC) on the sample just produced
            u = p.corr[i]
            sample = self._apply(u, self.last, self.ms, m)
        self.ms = (self.ms + [m])[-p.solver_order:]
        self.last = sample
        return self._apply(p.pred[i], sample, self.ms, None)

    @staticmethod
    def _apply(u: Update, x: torch.Tensor, ms: list[torch.Tensor], m_t: torch.Tensor | None) -> torch.Tensor:
        m0 = ms[-1]
        x_t_ = u.a * x - u.b * m0
        n_old = len(u.rks)
        res = 0
        if n_old:
            d1s = [(ms[-(k + 2)] - m0) / u.rks[k] for k in range(n_old)]
            res = d1s[0] * u.rhos[0] if n_old == 1 else sum(r * d for r, d in zip(u.rhos, d1s))
        if m_t is not None:                               # corrector: rho_t * (m_t - m0)
            return x_t_ - u.c * (res + u.rhos[-1] * (m_t - m0))
        return x_t_ - u.c * res
