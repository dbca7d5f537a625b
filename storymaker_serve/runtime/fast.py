"""`torch-opt`: the optimised PyTorch backend (GPU first; every option also runs on a CPU).

One `FastOptions` flag per optimisation (all positive; benchmarks/run.py
exposes each): `precision` (fp32/fp16/bf16 for UNet, text encoders, CLIP,
resampler; the VAE stays fp32 unless `vae_precision` says otherwise, since SDXL's
VAE overflows in fp16), LoRA fused at load (always: exact), SDPA self-attention
(diffusers' default), `dual_attention_kernel` (kernels/dual_attention.py for
every decoupled cross-attention), `fused_qkv` (one GEMM for Q|K|V in
self-attention, K|V and K_ip|V_ip in cross-attention; runtime/attention.py),
`offload_encoders` (CLIP vision and the resampler, 1.9 GB in fp16 at the released
sizes, stay on the host and visit the device once per story's character
encoding), `channels_last` (UNet/VAE/ControlNet memory format), `cuda_graph` (the UNet step captured
once per static shape and replayed), `compile` (torch.compile of the UNet, mode
max-autotune; with `cuda_graph` too, "max-autotune-no-cudagraphs" inside our
own capture, so the two graph mechanisms never nest). The UniPC loop uses
host-precomputed scalars (runtime/unipc.py), keeps latents on the device and
never synchronises with the host inside the loop (the loop, ControlNet branch
and decode are runtime/denoise.py's, as for every backend); character tokens
are computed once per story by the caller. Parity with the reference:
tests/test_fast.py (cosine >= 0.999 on latents after 25 steps, fp32, CPU).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from storymaker_serve.runtime.denoise import TorchDenoiser, VAEDecode, decode, denoise, step_inputs
from storymaker_serve.runtime.pipeline import GenerateOptions, StoryMakerPipeline, TextEmbeds, encode_text

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FastOptions:
    precision: str = "fp16"
    vae_precision: str = "fp32"
    dual_attention_kernel: bool = False
    channels_last: bool = False
    fused_qkv: bool = False
    offload_encoders: bool = False
    cuda_graph: bool = False
    compile: bool = False


class GraphCapture:
    """Captures on a GPU: one memory pool and one capture stream shared by every graph of a pipeline.

    Without a shared pool each capture keeps a private pool for the life of its graph, so a server that meets
    many shapes grows without bound. Graphs of one pipeline are replayed one at a time on one stream, which is
    the condition under which PyTorch allows captures to share a pool (the same stream is passed to every
    capture, as torch.cuda.graph asks for effective sharing). A graph's output buffer lives in that pool, so it
    is valid until the next replay of any graph: GraphedStep's callers consume it before the next step."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def __call__(self, fn, static: dict):
        """Warm fn up on the capture stream, capture one call on the static buffers; returns the graph's replay."""
        s = self.stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):                                    # warm-up outside the graph (lazy inits, autotuning)
                fn(static["x"], static["t"], static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool, stream=s):
            static["out"] = fn(static["x"], static["t"], static)
        static["graph"] = g                                       # keep the graph alive while it is cached
        return g.replay


class GraphedStep:
    """The UNet step as a replayed graph: static input/output buffers, one capture per input shape.

    Each call copies x, t and the step inputs into the buffers captured for their shapes and replays; the
    result is the captured output buffer itself, overwritten by the next replay, so callers must consume it
    (FastPipeline.latents does: CFG arithmetic makes a new tensor before the next step). At most `max_graphs`
    shapes stay captured (least recently used evicted: its graph and buffers are dropped, and their memory goes
    back to the shared pool for the next capture). `capture` is a GraphCapture on a GPU; tests pass a CPU
    stand-in with the same buffer semantics.
    """

    def __init__(self, fn, capture=None, max_graphs: int = 8):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn, self.capture, self.max_graphs = fn, capture, max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.captures = self.evictions = 0

    def __call__(self, x, t, inp):
        key = (tuple(x.shape), x.dtype, t.dtype) + tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inp.items()))
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            while len(self.graphs) >= self.max_graphs:
                _, (_, old) = self.graphs.popitem(last=False)
                old.clear()                                       # drop the graph and its static buffers
                self.evictions += 1
            if self.capture is None:
                self.capture = GraphCapture()
            static = {"x": x.clone(), "t": t.clone(), **{k: v.clone() for k, v in inp.items()}}
            self.graphs[key] = (self.capture(self.fn, static), static)
            self.captures += 1
        replay, static = self.graphs[key]
        static["x"].copy_(x)
        static["t"].copy_(t)
        for k, v in inp.items():
            static[k].copy_(v)
        replay()
        return static["out"]


@dataclass
class StageTimes:
    seconds: dict = field(default_factory=dict)

    def add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt


class FastPipeline(StoryMakerPipeline):
    def __init__(self, models, opts: FastOptions | None = None):
        super().__init__(models)
        self.o = opts = opts or FastOptions()
        unet = models.sdxl.unet
        p = next(unet.parameters())
        self.dev, self.dt = p.device, DTYPES[opts.precision]
        for mod in (unet, models.sdxl.text_encoder, models.sdxl.text_encoder_2):
            mod.to(self.dev, self.dt)
        for mod in (models.ppr, models.image_encoder):  # with offload_encoders they live on the host between stories
            mod.to("cpu" if opts.offload_encoders else self.dev, self.dt)
        models.sdxl.vae.to(self.dev, DTYPES[opts.vae_precision])
        if models.controlnet is not None:
            models.controlnet.to(self.dev, self.dt)
        self.kernel = None                                     # what the cross-attention runs: None = not asked
        if opts.dual_attention_kernel:
            from storymaker_serve.runtime.kernel_attention import kernel_unavailable, use_dual_attention_kernel

            use_dual_attention_kernel(unet, self.dev)          # raises on CUDA when the kernel cannot run
            why = kernel_unavailable(self.dev)
            self.kernel = f"fallback: {why}" if why else "fused"
        if opts.fused_qkv:
            from storymaker_serve.runtime.attention import use_fused_projections

            use_fused_projections(unet)                        # after .to(): the aliases must share one dtype/device
        if opts.channels_last:
            for mod in (unet, models.sdxl.vae, models.controlnet):
                if mod is not None:
                    mod.to(memory_format=torch.channels_last)
        graphed = opts.cuda_graph and self.dev.type == "cuda"
        mode = "max-autotune-no-cudagraphs" if graphed else "max-autotune"
        unet_fn = torch.compile(unet, mode=mode, fullgraph=False) if opts.compile else unet
        self.denoiser = TorchDenoiser(unet, models.controlnet, unet_fn=unet_fn, dtype=self.dt, device=self.dev)
        if graphed:
            self.denoiser.step = GraphedStep(self.denoiser.forward)

    def _sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    @contextmanager
    def encoders_on_device(self):
        """With offload_encoders: CLIP vision and the resampler on the device inside the block, on the host after."""
        if not self.o.offload_encoders:
            yield
            return
        encoders = (self.m.image_encoder, self.m.ppr)
        try:
            for mod in encoders:
                mod.to(self.dev)
            yield
        finally:
            for mod in encoders:
                mod.to("cpu")
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    def encode_characters(self, chars, identity_only=False, interpolation=None):
        """(positive, negative) image tokens on the device, computed once per story."""
        with self.encoders_on_device():
            return tuple(t.to(self.dev) for t in super().encode_characters(chars, identity_only, interpolation))

    def latents(self, opts: GenerateOptions, text: TextEmbeds, tokens, times: StageTimes | None = None,
                step_callback=None) -> torch.Tensor:
        """runtime.denoise.denoise on the device: no host synchronisation until the caller reads the result."""
        t0 = time.perf_counter()
        x = denoise(self.denoiser, step_inputs(text, tokens, opts, self.dev), opts, self.plan(opts),
                    self.vae_factor, self.m.sdxl.unet.config.in_channels, device=self.dev,
                    channels_last=self.o.channels_last, step_callback=step_callback)
        if times is not None:
            self._sync()
            times.add("denoise", time.perf_counter() - t0)
        return x

    def decode(self, x: torch.Tensor):
        return decode(VAEDecode(self.m.sdxl.vae), x)

    def generate(self, opts: GenerateOptions, tokens, times: StageTimes | None = None, step_callback=None):
        opts.validate(self.vae_factor)
        t0 = time.perf_counter()
        text = encode_text(self.m.sdxl, opts.prompt, opts.negative_prompt)
        if times is not None:
            self._sync()
            times.add("text", time.perf_counter() - t0)
        x = self.latents(opts, text, tokens, times, step_callback)
        t1 = time.perf_counter()
        img = self.decode(x)
        if times is not None:
            times.add("vae", time.perf_counter() - t1)
        return img
