"""runtime/fused.py's kernels are bit-identical to the torch ops they replace (torch.equal, no tolerance), over whole
sampling runs and every decode rounding case, and are actually in use on the host."""

import numpy as np
import pytest
import torch
from helpers import SDXL_SCHEDULER

from storymaker_serve.runtime import fused
from storymaker_serve.runtime.denoise import decode
from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.unipc import UniPCPlan, UniPCSampler


def test_kernels_are_in_use():
    """numba is a dependency: without it every parity test below would compare the torch ops with themselves."""
    assert fused.enabled()
    s = UniPCSampler(UniPCPlan(SDXL_SCHEDULER, 3))
    assert fused.unipc_step(s, torch.randn(2, 4, 8, 8), 5.0, 0, torch.randn(1, 4, 8, 8)) is not None
    assert fused.to_uint8(torch.rand(3, 4, 4)) is not None


def _torch_step(sampler, eps2, guidance, i, x):
    uncond, cond = eps2.chunk(2)          # runtime/denoise.py's loop before the kernel: the torch ops
    return sampler.step(uncond + guidance * (cond - uncond), i, x)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
def test_guided_step_bit_identical_over_a_run(steps):
    plan = UniPCPlan(SDXL_SCHEDULER, steps)
    g = torch.Generator().manual_seed(steps)
    ref, new = UniPCSampler(plan), UniPCSampler(plan)
    x_ref = x_new = torch.randn(1, 4, 40, 30, generator=g) * plan.init_noise_sigma
    for i in range(steps):
        # model-like eps that depends on the sample; handed over as rows 2..3 of a bigger batch, as the step batcher
        # gives each loop its rows of a shared UNet execution
        batch = torch.randn(6, 4, 40, 30, generator=g) * (1 + i % 3)
        batch[2:4] += 0.1 * x_ref
        x_ref = _torch_step(ref, batch[2:4], 7.5, i, x_ref)
        x_new = new.guided_step(batch[2:4], 7.5, i, x_new)
        assert torch.equal(x_ref, x_new), (i, (x_ref - x_new).abs().max().item())
        pair = new.doubled(x_new)                      # the next CFG batch, written by the kernel
        assert pair is new.pair[1] and torch.equal(pair, torch.cat([x_ref, x_ref]))
        assert torch.equal(ref.last, new.last) and all(torch.equal(a, b) for a, b in zip(ref.ms, new.ms))
        assert len(ref.ms) == len(new.ms)


def test_guided_step_extreme_values_bit_identical():
    """Signed zeros, tiny and huge values: the kernel's operand order and float32 coefficients are torch's."""
    plan = UniPCPlan(SDXL_SCHEDULER, 6)
    vals = torch.tensor([0.0, -0.0, 1e-38, -1e-38, 1e30, -1e30, 3.0e-45, 1.0, -1.0, 0.5])
    ref, new = UniPCSampler(plan), UniPCSampler(plan)
    x_ref = x_new = vals.repeat(8).reshape(1, 4, 4, 5)
    for i in range(6):
        eps = vals.roll(i).repeat(16).reshape(2, 4, 4, 5)
        x_ref = _torch_step(ref, eps, 5.0, i, x_ref)
        x_new = new.guided_step(eps, 5.0, i, x_new)
        assert torch.equal(x_ref.view(torch.int32), x_new.view(torch.int32)), i     # the bits, signs of zero too


def test_guided_step_falls_back_where_the_kernel_does_not_apply():
    plan = UniPCPlan(SDXL_SCHEDULER, 4)
    for eps, x in [(torch.randn(2, 4, 8, 8).half(), torch.randn(1, 4, 8, 8).half()),
                   (torch.randn(2, 4, 8, 16)[..., ::2], torch.randn(1, 4, 8, 8))]:
        assert fused.unipc_step(UniPCSampler(plan), eps, 5.0, 0, x) is None
        ref, new = UniPCSampler(plan), UniPCSampler(plan)
        assert torch.equal(_torch_step(ref, eps, 5.0, 0, x), new.guided_step(eps, 5.0, 0, x))


def test_fused_off_by_environment(monkeypatch):
    monkeypatch.setenv("STORYMAKER_FUSED", "0")
    assert not fused.enabled()
    assert fused.unipc_step(UniPCSampler(UniPCPlan(SDXL_SCHEDULER, 3)), torch.randn(2, 1, 2, 2), 1.0, 0,
                            torch.randn(1, 1, 2, 2)) is None


def _torch_decode(img):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORYMAKER_FUSED", "0")
        return decode(lambda _: img, None)


def test_decode_rounding_bit_identical():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 37, 29, generator=g)
    halves = (torch.arange(255, dtype=torch.float32) + 0.5) / 255       # x * 255 lands on (or next to) .5
    img.view(-1)[:255] = halves
    img.view(-1)[256:512] = torch.arange(256, dtype=torch.float32) / 255
    img.view(-1)[512:515] = torch.tensor([0.0, 1.0, 0.49999997 / 255])
    ref = _torch_decode(img)
    new = decode(lambda _: img, None)
    assert new.dtype == np.uint8 and new.shape == (37, 29, 3)
    assert np.array_equal(ref, new)
    assert np.array_equal(decode(lambda _: img.numpy(), None), ref)      # a numpy image, as a vae engine returns


def test_decode_clamps_outside_the_unit_range():
    """The decoder's output is in [0, 1]; beyond it the kernel clamps (the torch cast to uint8 wraps 256 to 0)."""
    img = torch.tensor([-0.5, 1.002, 2.0, 1.0]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    assert decode(lambda _: img, None)[..., 0].tolist() == [[0, 255], [255, 255]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_decode_refuses_non_finite_pixels(bad):
    img = torch.rand(1, 3, 8, 8)
    img[0, 2, 7, 7] = bad
    with pytest.raises(InputError, match="non-finite pixels"):
        decode(lambda _: img, None)
    with pytest.raises(InputError, match="non-finite pixels"):
        _torch_decode(img)


def test_warm_up_compiles_what_real_steps_use():
    """warm_up (called when a served model loads) compiles each kernel for the argument types real steps and
    decodes pass: after it, a whole sampling run and a decode compile nothing more (a request would pay for it)."""
    fused.warm_up()
    kernels = fused._load()
    compiled = {name: list(k.signatures) for name, k in kernels.items()}
    assert set(compiled) == {"unipc", "uint8"} and all(len(sigs) == 1 for sigs in compiled.values()), compiled
    s = UniPCSampler(UniPCPlan(SDXL_SCHEDULER, 4))
    x = torch.randn(1, 4, 8, 8)
    for i in range(4):
        x = fused.unipc_step(s, torch.randn(2, 4, 8, 8), 5.0, i, x)
        assert x is not None                                   # the kernel ran, not the torch fallback
    assert fused.to_uint8(torch.rand(3, 16, 16)) is not None
    assert {name: list(k.signatures) for name, k in kernels.items()} == compiled


def test_kernels_that_cannot_load_fall_back_to_torch_ops(monkeypatch, caplog):
    """numba failing to load the kernels (e.g. no writable cache folder in a read-only install) never fails a
    request: a warning names the fix and the torch ops compute the same numbers."""
    def broken():
        raise RuntimeError("cannot cache function 'unipc': no locator available")

    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_compile", broken)
    assert not fused.enabled()
    assert "NUMBA_CACHE_DIR" in caplog.text
    plan = UniPCPlan(SDXL_SCHEDULER, 3)
    eps, x = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(UniPCSampler(plan).guided_step(eps, 5.0, 0, x), _torch_step(UniPCSampler(plan), eps, 5.0, 0, x))
