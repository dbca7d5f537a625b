"""Every sampler's host-precomputed plan against diffusers' own scheduler (the oracle) over whole runs of 1-25
steps, with a model-like eps that depends on the sample and, for the stochastic ones, the same generator: the
same float32 operations in the same order, so the runs are bit-identical."""
import numpy as np
import pytest
import torch
from helpers import SDXL_SCHEDULER

from storymaker_serve.runtime.errors import InputError, StoryMakerError
from storymaker_serve.runtime.sampler_names import SCHEDULERS
from storymaker_serve.runtime.schedulers import TCD_GAMMA, diffusers_scheduler, make_plan, sampler_for

STEPS = [1, 2, 3, 4, 8, 25]


def _eps(x, i):
    return torch.tanh(x) * 0.5 + 0.01 * i                           # a deterministic, sample-dependent "model"


def _run_diffusers(name, steps, spacing, seed=7, shape=(1, 4, 8, 8)):
    sched = diffusers_scheduler(name, SDXL_SCHEDULER, spacing)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g) * sched.init_noise_sigma
    kw = {"generator": g} if "generator" in sched.step.__code__.co_varnames else {}
    if name == "tcd":
        kw["eta"] = TCD_GAMMA
    xs, ts = [], []
    for i, t in enumerate(sched.timesteps):
        x = sched.step(_eps(sched.scale_model_input(x, t), i), t, x, return_dict=False, **kw)[0]
        xs.append(x)
        ts.append(float(t))
    return xs, ts, float(sched.init_noise_sigma)


def _run_plan(name, steps, spacing, seed=7, shape=(1, 4, 8, 8)):
    plan = make_plan(name, SDXL_SCHEDULER, steps, spacing)
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g)
    sampler = sampler_for(plan, g, shape)
    x = x * plan.init_noise_sigma
    xs = []
    for i in range(len(plan.timesteps)):
        x = sampler.step(_eps(sampler.model_input(x, i), i), i, x)
        xs.append(x)
    return xs, plan.timesteps, plan.init_noise_sigma


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", STEPS)
def test_plan_runs_as_diffusers_scheduler(name, steps):
    if name == "lcm" and steps > 50:
        pytest.skip("LCM covers at most its 50 original steps")
    ref, ts_ref, sigma_ref = _run_diffusers(name, steps, None)
    new, ts_new, sigma_new = _run_plan(name, steps, None)
    assert ts_new == ts_ref and sigma_new == pytest.approx(sigma_ref, rel=1e-7)
    worst = max(float((a - b).abs().max()) for a, b in zip(ref, new))
    assert worst == 0.0, (name, steps, worst)        # the same float32 operations in the same order


@pytest.mark.parametrize("name", ["unipc", "dpmpp-2m", "euler", "euler-a", "ddim"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacing_override_follows_diffusers(name, spacing):
    ref, ts_ref, _ = _run_diffusers(name, 6, spacing)
    new, ts_new, _ = _run_plan(name, 6, spacing)
    assert ts_new == ts_ref
    assert all(torch.equal(a, b) for a, b in zip(ref, new))


def test_stochastic_samplers_depend_on_the_seed_only_through_the_generator():
    a, _, _ = _run_plan("euler-a", 4, None, seed=1)
    b, _, _ = _run_plan("euler-a", 4, None, seed=1)
    c, _, _ = _run_plan("euler-a", 4, None, seed=2)
    assert torch.equal(a[-1], b[-1]) and not torch.equal(a[-1], c[-1])


def test_unknown_names_list_the_choices():
    with pytest.raises(InputError, match="scheduler 'bogus' is not one of unipc, dpmpp-2m, .*, tcd"):
        make_plan("bogus", SDXL_SCHEDULER, 4)
    with pytest.raises(InputError, match="timestep spacing 'sideways' is not one of leading, trailing, linspace"):
        make_plan("euler", SDXL_SCHEDULER, 4, "sideways")


# ---- whole frames on the demo bundle ----
class _Counting:
    """A denoiser wrapper that counts the UNet rows it evaluates."""

    def __init__(self, inner):
        self.inner, self.rows = inner, 0

    def prepare(self, inputs):
        self.inner.prepare(inputs)

    def __call__(self, x, t):
        self.rows += x.shape[0]
        return self.inner(x, t)


@pytest.fixture(scope="module")
def frame_setup(pipe, two_characters):
    from storymaker_serve.runtime.pipeline import encode_text

    tokens = pipe.encode_characters(two_characters[:1])
    return pipe, tokens, encode_text(pipe.m.sdxl, "a man in a park", None)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_frames_equal_a_diffusers_scheduler_run(frame_setup, name, guidance):
    """The reference pipeline's frame against diffusers' scheduler driving the same UNet (tests/oracle.py), within
    1 uint8 level; without CFG (guidance <= 1) the loop evaluates half the UNet rows."""
    from oracle import diffusers_sample

    from storymaker_serve.runtime.denoise import TorchDenoiser, VAEDecode, decode, denoise, step_inputs
    from storymaker_serve.runtime.pipeline import GenerateOptions

    pipe, tokens, text = frame_setup
    opts = GenerateOptions("a man in a park", width=64, height=64, steps=4, seed=5, guidance=guidance, scheduler=name,
                           timestep_spacing="trailing" if name == "euler" else None)
    unet = pipe.m.sdxl.unet
    counting = _Counting(TorchDenoiser(unet))
    ours = denoise(counting, step_inputs(text, tokens, opts), opts, pipe.plan(opts), pipe.vae_factor)
    want = diffusers_sample(TorchDenoiser(unet), step_inputs(text, tokens, opts), opts, pipe.m.sdxl.scheduler_config,
                            pipe.vae_factor)
    assert counting.rows == opts.steps * (2 if guidance > 1 else 1)
    vae = VAEDecode(pipe.m.sdxl.vae)
    a, b = decode(vae, ours).astype(int), decode(vae, want).astype(int)
    assert np.abs(a - b).max() <= 1, (name, guidance)


def test_cfg_off_at_guidance_one_matches_the_positive_row(frame_setup):
    """At guidance 1 the frame is the positive row's alone, as diffusers does, not uncond + 1 * (cond - uncond)."""
    from storymaker_serve.runtime.pipeline import GenerateOptions

    pipe, tokens, _ = frame_setup
    one = pipe.generate(GenerateOptions("a man in a park", width=64, height=64, steps=3, seed=2, guidance=1.0), tokens)
    low = pipe.generate(GenerateOptions("a man in a park", width=64, height=64, steps=3, seed=2, guidance=0.0), tokens)
    assert np.array_equal(one, low)                       # neither runs the negative row


@pytest.mark.slow
@pytest.mark.parametrize("name,guidance", [("euler-a", 1.0), ("dpmpp-2m-karras", 5.0)])
def test_a_served_scheduler_gives_the_in_process_frame(client, built, name, guidance):
    """SCHEDULER on the served frame model: the same frame as the build's engines in process."""
    from helpers import MAN

    from storymaker_serve.runtime.pipeline import GenerateOptions
    from storymaker_serve.runtime.serving.engines import Build
    from storymaker_serve.runtime.serving.logic import EnginePipeline

    tokens = client.encode_characters([MAN])
    opts = dict(width=64, height=64, steps=3, seed=3, guidance=guidance, scheduler=name)
    served, _ = client.generate("a man in a park", tokens=tokens, **opts)
    local = EnginePipeline(Build(built)).generate(GenerateOptions("a man in a park", **opts), tokens)
    assert np.abs(served.astype(int) - local.astype(int)).max() <= 1
    with pytest.raises(StoryMakerError, match="invalid input: .*scheduler 'bogus' is not one of unipc"):
        client.generate("a man in a park", tokens=tokens, **{**opts, "scheduler": "bogus"})
