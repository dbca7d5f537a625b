"""Host-precomputed UniPC equals diffusers' UniPCMultistepScheduler (SDXL scheduler config) to 1e-6."""

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from helpers import SDXL_SCHEDULER

from storymaker_serve.runtime.unipc import UniPCPlan, UniPCSampler


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 25])
def test_unipc_plan_matches_diffusers(steps):
    ref = UniPCMultistepScheduler.from_config(SDXL_SCHEDULER)
    ref.set_timesteps(steps)
    plan = UniPCPlan(SDXL_SCHEDULER, steps)
    assert plan.timesteps == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(steps)
    x_ref = x_new = torch.randn(2, 4, 16, 16, generator=g)
    fast = UniPCSampler(plan)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn(2, 4, 16, 16, generator=g) + 0.1 * x_ref     # model-like: depends on the sample
        x_ref = ref.step(eps, t, x_ref, return_dict=False)[0]
        x_new = fast.step(eps, i, x_new)
        worst = max(worst, (x_ref - x_new).abs().max().item())
        x_new = x_ref.clone()        # same input next step: compares each step's update, not accumulated drift
    assert worst <= 1e-6, worst


def test_unipc_full_trajectory_close():
    """Without re-synchronising, 25 steps stay within 1e-5 (float32 rounding only)."""
    ref = UniPCMultistepScheduler.from_config(SDXL_SCHEDULER)
    ref.set_timesteps(25)
    fast = UniPCSampler(UniPCPlan(SDXL_SCHEDULER, 25))
    g = torch.Generator().manual_seed(0)
    a = b = torch.randn(1, 4, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        eps_a, eps_b = torch.tanh(a) * 0.5, torch.tanh(b) * 0.5   # a deterministic "model"
        a = ref.step(eps_a, t, a, return_dict=False)[0]
        b = fast.step(eps_b, i, b)
    assert (a - b).abs().max().item() <= 1e-5


def test_unipc_rejects_unsupported_config():
    with pytest.raises(NotImplementedError):
        UniPCPlan({**SDXL_SCHEDULER, "prediction_type": "v_prediction"}, 10)
