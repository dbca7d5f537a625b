"""torch-opt backend vs the reference pipeline: latents after 25 steps at the same seed (fp32, CPU).

The dual-attention kernel inside a UNet step is checked in tests/test_dual_attention.py (interpreted on CPU it
would make 25 steps slow); here: host-precomputed UniPC, device-resident loop, channels_last.
"""
import numpy as np

from runtime.fast import FastOptions, FastPipeline, StageTimes
from runtime.loaders import load_storymaker
from runtime.pipeline import GenerateOptions, TorchDenoiser, encode_text, sample, step_inputs


def test_torch_opt_latents_match_reference(layout, two_characters):
    ref_m, fast_m = load_storymaker(layout), load_storymaker(layout)
    fast = FastPipeline(fast_m, FastOptions(precision="fp32", channels_last=True))
    from runtime.pipeline import StoryMakerPipeline

    tokens = StoryMakerPipeline(ref_m).encode_characters(two_characters)
    opts = GenerateOptions("a man and a woman on a bridge", negative_prompt="blurry", width=64, height=64, steps=25,
                           seed=5, guidance=7.5, ip_scale=0.8)
    text = encode_text(ref_m.sdxl, opts.prompt, opts.negative_prompt)
    want = sample(TorchDenoiser(ref_m.sdxl.unet), step_inputs(text, tokens, opts), opts, ref_m.sdxl.scheduler_config)
    times = StageTimes()
    got = fast.latents(opts, encode_text(fast_m.sdxl, opts.prompt, opts.negative_prompt), tokens, times).cpu()
    a, b = want.flatten().double(), got.flatten().double()
    cos = float(a @ b / (a.norm() * b.norm()))
    assert cos >= 0.999, cos
    assert (a - b).abs().max() < 1e-3            # fp32: only summation-order differences
    assert times.seconds["denoise"] > 0
    img = fast.decode(got.to(fast.dev))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
