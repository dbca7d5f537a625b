"""torch-opt backend vs the reference pipeline: latents after 25 steps at the same seed (fp32, CPU).

The dual-attention kernel inside a UNet step is checked in tests/test_dual_attention.py (interpreted on CPU it
would make 25 steps slow); here: host-precomputed UniPC, device-resident loop, channels_last, fused projections,
no host reads inside the loop, and the torch.compile path (run on the CPU through inductor).
"""

import numpy as np
import pytest
import torch
from helpers import DATA, HostSyncs
from oracle import diffusers_sample

from storymaker_serve.runtime.denoise import TorchDenoiser, step_inputs
from storymaker_serve.runtime.fast import FastOptions, FastPipeline, StageTimes
from storymaker_serve.runtime.loaders import load_storymaker
from storymaker_serve.runtime.pipeline import GenerateOptions, encode_text


def test_torch_opt_latents_match_reference(layout, two_characters):
    ref_m, fast_m = load_storymaker(layout), load_storymaker(layout)
    fast = FastPipeline(fast_m, FastOptions(precision="fp32", channels_last=True))
    from storymaker_serve.runtime.pipeline import StoryMakerPipeline

    tokens = StoryMakerPipeline(ref_m).encode_characters(two_characters)
    opts = GenerateOptions("a man and a woman on a bridge", negative_prompt="blurry", width=64, height=64, steps=25,
                           seed=5, guidance=7.5, ip_scale=0.8)
    text = encode_text(ref_m.sdxl, opts.prompt, opts.negative_prompt)
    want = diffusers_sample(TorchDenoiser(ref_m.sdxl.unet), step_inputs(text, tokens, opts), opts,
                            ref_m.sdxl.scheduler_config)
    times = StageTimes()
    got = fast.latents(opts, encode_text(fast_m.sdxl, opts.prompt, opts.negative_prompt), tokens, times).cpu()
    a, b = want.flatten().double(), got.flatten().double()
    cos = float(a @ b / (a.norm() * b.norm()))
    assert cos >= 0.999, cos
    assert (a - b).abs().max() < 1e-3            # fp32: only summation-order differences
    assert times.seconds["denoise"] > 0
    img = fast.decode(got.to(fast.dev))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_denoising_loop_never_waits_on_the_host(layout, two_characters):
    """The torch-opt loop (UniPC, CFG, UNet with fused projections) reads no tensor value on the host, so on a GPU
    it never synchronises and can be captured as a CUDA graph."""
    m = load_storymaker(layout)
    fast = FastPipeline(m, FastOptions(precision="fp32", fused_qkv=True, channels_last=True))
    tokens = fast.encode_characters(two_characters)
    opts = GenerateOptions("two friends", width=64, height=64, steps=4, seed=1)
    text = encode_text(m.sdxl, opts.prompt, opts.negative_prompt)
    fast.latents(opts, text, tokens)                 # the UniPC plan (host arithmetic, once per step count)
    with HostSyncs() as probe:
        fast.latents(opts, text, tokens)
    assert probe.ops == []
    with HostSyncs() as probe:                       # the probe does see a host read
        torch.ones(2).sum().item()
        bool(torch.ones(1) > 0)
    assert len(probe.ops) >= 2, probe.ops


@pytest.mark.slow
def test_compiled_unet_matches_eager(layout, two_characters):
    """`--compile` (torch.compile, max-autotune; inductor's C++ backend on a CPU) with fused projections and
    channels_last gives the eager latents. Slow-ish (~30 s of compilation on 2 cores)."""
    eager = FastPipeline(load_storymaker(layout), FastOptions(precision="fp32"))
    comp = FastPipeline(load_storymaker(layout), FastOptions(precision="fp32", compile=True, fused_qkv=True,
                                                             channels_last=True))
    tokens = eager.encode_characters(two_characters)
    opts = GenerateOptions("two friends", width=64, height=48, steps=3, seed=2)
    text = encode_text(eager.m.sdxl, opts.prompt, opts.negative_prompt)
    a, b = eager.latents(opts, text, tokens).flatten().double(), comp.latents(opts, text, tokens).flatten().double()
    cos = float(a @ b / (a.norm() * b.norm()))
    assert cos >= 0.99999 and (a - b).abs().max() < 1e-3, (cos, (a - b).abs().max())


def replay_on_cpu(fn, static: dict):
    """CUDA-graph semantics without a GPU: the captured output is one buffer that every replay overwrites, and a
    replay reads only the static input buffers."""
    static["out"] = fn(static["x"], static["t"], static).clone()
    static["captures"] = static.get("captures", 0) + 1
    return lambda: static["out"].copy_(fn(static["x"], static["t"], static))


def test_graphed_step_buffers_give_the_eager_loop(layout, two_characters):
    """GraphedStep's static buffers (one capture per shape, inputs copied in, output overwritten per replay) give
    the eager latents, for two prompts and two sizes through the same object."""
    from storymaker_serve.runtime.fast import GraphedStep

    eager = FastPipeline(load_storymaker(layout), FastOptions(precision="fp32"))
    graphed = FastPipeline(load_storymaker(layout), FastOptions(precision="fp32"))
    graphed.denoiser.step = GraphedStep(graphed.denoiser.forward, capture=replay_on_cpu)
    tokens = eager.encode_characters(two_characters)
    for prompt, w, h in (("two friends", 64, 48), ("a quiet street", 64, 48), ("two friends", 48, 64)):
        opts = GenerateOptions(prompt, width=w, height=h, steps=4, seed=3)
        text = encode_text(eager.m.sdxl, opts.prompt, opts.negative_prompt)
        want, got = eager.latents(opts, text, tokens), graphed.latents(opts, text, tokens)
        assert torch.allclose(want, got, atol=1e-6), (prompt, w, h)
    assert len(graphed.denoiser.step.graphs) == 2                     # one capture per latent shape
    assert all(static["captures"] == 1 for _, static in graphed.denoiser.step.graphs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_torch_opt_on_gpu_matches_fp32_reference(layout, two_characters, precision):
    """GPU acceptance: torch-opt in fp16/bf16 with every optimisation (kernel, fused projections, channels_last,
    offloaded encoders, CUDA graph) vs the fp32 reference on the CPU, latents after 25 steps, cosine >= 0.999."""
    from storymaker_serve.runtime.pipeline import StoryMakerPipeline

    ref_m = load_storymaker(layout)
    tokens = StoryMakerPipeline(ref_m).encode_characters(two_characters)
    opts = GenerateOptions("a man and a woman on a bridge", negative_prompt="blurry", width=64, height=64, steps=25,
                           seed=5, guidance=7.5, ip_scale=0.8)
    text = encode_text(ref_m.sdxl, opts.prompt, opts.negative_prompt)
    want = diffusers_sample(TorchDenoiser(ref_m.sdxl.unet), step_inputs(text, tokens, opts), opts,
                            ref_m.sdxl.scheduler_config)
    fast = FastPipeline(load_storymaker(layout, device="cuda"),
                        FastOptions(precision=precision, dual_attention_kernel=True, fused_qkv=True, channels_last=True,
                                    offload_encoders=True, cuda_graph=True))
    fast_tokens = fast.encode_characters(two_characters)             # encoders visit the GPU, then go home
    assert next(fast.m.image_encoder.parameters()).device.type == "cpu" and fast_tokens[0].is_cuda
    got = fast.latents(opts, encode_text(fast.m.sdxl, opts.prompt, opts.negative_prompt), fast_tokens).cpu()
    a, b = want.flatten().double(), got.flatten().double()
    assert float(a @ b / (a.norm() * b.norm())) >= 0.999
    assert len(fast.denoiser.step.graphs) == 1


def test_torch_opt_keeps_every_tensor_on_its_device(layout, two_characters):
    """The whole torch-opt path on a second device without a GPU: the `meta` device holds no data, so any tensor
    left on the CPU next to a device tensor, and any host read, raises. Character encoding, text, the loop
    (fp16, fused projections, channels_last, ControlNet frame) and the VAE run there."""
    from PIL import Image

    m = load_storymaker(layout)
    m.sdxl.unet.to("meta")                                       # FastPipeline follows the UNet's device
    fast = FastPipeline(m, FastOptions(precision="fp16", fused_qkv=True, channels_last=True))
    tokens = fast.encode_characters(two_characters)
    pose = np.asarray(Image.open(DATA / "two_people_pose.jpg").convert("RGB"))
    for pose_image in (None, pose):
        opts = GenerateOptions("two friends", width=64, height=48, steps=3, seed=1, pose_image=pose_image)
        x = fast.latents(opts, encode_text(m.sdxl, opts.prompt, opts.negative_prompt), tokens)
        assert x.device.type == "meta" and x.shape == (1, 4, 6, 8)
        img = m.sdxl.vae.decode(x / m.sdxl.vae.config.scaling_factor, return_dict=False)[0]
        assert img.device.type == "meta" and img.shape == (1, 3, 48, 64)
    assert all(t.device.type == "meta" for t in tokens)


def test_graphed_step_keeps_a_bounded_lru_of_captures():
    """A long-running server meets many shapes: at most max_graphs stay captured (least recently used evicted,
    its buffers dropped), a shape met again after eviction is captured anew, and every result is still the eager
    one. On a GPU the captures share one memory pool (GraphCapture), so evicted memory is reused."""
    from storymaker_serve.runtime.fast import GraphedStep

    fn = lambda x, t, inp: x * t + inp["e"].sum()
    step = GraphedStep(fn, capture=replay_on_cpu, max_graphs=2)
    shapes = [(1, 4), (2, 4), (1, 4), (3, 4), (2, 4), (1, 4)]
    for n, (a, b) in enumerate(shapes):
        x, t, e = torch.full((a, b), float(n)), torch.tensor(2.0), torch.ones(a)
        assert torch.equal(step(x, t, {"e": e}), fn(x, t, {"e": e}))
    # (1,4) cap, (2,4) cap, (1,4) hit, (3,4) cap evicts (2,4), (2,4) cap evicts (1,4), (1,4) cap evicts (3,4)
    assert (step.captures, step.evictions, len(step.graphs)) == (5, 3, 2)
    assert [k[0] for k in step.graphs] == [(2, 4), (1, 4)]
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedStep(fn, max_graphs=0)


def test_bf16_keeps_timesteps_and_time_ids_in_float32(layout, two_characters):
    """In bf16 the 25-step schedule would round (951 -> 952, 913 -> 912): torch-opt hands the UNet float32
    timesteps equal to the plan's, and float32 time_ids, whatever the model precision."""
    from storymaker_serve.runtime.unipc import UniPCPlan

    m = load_storymaker(layout)
    fast = FastPipeline(m, FastOptions(precision="bf16"))
    tokens = fast.encode_characters(two_characters)
    opts = GenerateOptions("two friends", width=64, height=64, steps=25, seed=1)
    seen = []
    step = fast.denoiser.step
    fast.denoiser.step = lambda x, t, inp: seen.append((t.clone(), inp["time_ids"].dtype, x.dtype)) or step(x, t, inp)
    fast.latents(opts, encode_text(m.sdxl, opts.prompt, opts.negative_prompt), tokens)
    plan = UniPCPlan(m.sdxl.scheduler_config, 25)
    assert [float(t) for t, _, _ in seen] == [float(v) for v in plan.timesteps]
    assert all(t.dtype == torch.float32 and ids == torch.float32 and x == torch.bfloat16 for t, ids, x in seen)
    rounded = torch.tensor(plan.timesteps, dtype=torch.bfloat16).float()
    assert (rounded != torch.tensor(plan.timesteps, dtype=torch.float32)).any()     # bf16 would have changed them
