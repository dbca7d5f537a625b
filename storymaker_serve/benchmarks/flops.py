"""FLOPs of one StoryMaker image, counted (not timed) on the meta device, and % of a GPU's fp16 peak.

`image_flops(models, size, characters, steps)` rebuilds each model from its
config on the `meta` device (no memory, no compute: a 2.9 B-parameter UNet
takes about a second) and runs one forward per stage under
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions
and attention (2 FLOPs per multiply-add). Stages match benchmarks/run.py:
`encoders` (CLIP vision on the character and face crops, 2 images per
character; the buffalo_l face models are ONNX and not counted), `ppr` (positive
and negative tokens), `text` (both SDXL text encoders on prompt and negative),
`denoise` (steps x one CFG UNet call, batch 2, fused LoRA: the work the model
needs, whatever a backend spends) and `vae` (decode). Elementwise work
(norms, activations, the UniPC update) is not counted, so achieved TFLOP/s is
a lower bound. `python -m benchmarks.flops --weights random-full --size 1024`
prints the table; SDXL's UNet alone at 1024^2 counts 6.76 TFLOP per pass.

`FP16_PEAK_TFLOPS` are NVIDIA datasheet dense (no sparsity) fp16/bf16 tensor
figures; `peak_tflops(name)` matches `torch.cuda.get_device_name()`.
`weight_bytes` counts the parameter bytes each model keeps resident (the floor
under peak GPU memory).
"""
from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from storymaker_serve.runtime.adapter import build_processors
from storymaker_serve.runtime.attention import TEXT_TOKENS
from storymaker_serve.runtime.cli import argument_parser
from storymaker_serve.runtime.denoise import vae_scale_factor
from storymaker_serve.runtime.ppr import PositionalPerceiverResampler

FP16_PEAK_TFLOPS = [            # (substring of the device name, dense fp16 tensor TFLOP/s); first match wins
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H20", 148.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.2), ("B200", 2250.0),
]


def peak_tflops(device_name: str | None) -> float | None:
    for key, tflops in FP16_PEAK_TFLOPS:
        if device_name and key in device_name:
            return tflops
    return None


def _count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def meta_models(models):
    """Structure-only copies of the loaded (fused) StoryMaker models on the meta device."""
    s = models.sdxl
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(s.unet.config)
        unet.set_attn_processor(build_processors(unet, rank=0, lora_scale=1.0, ip_scale=0.8))
        vae = AutoencoderKL.from_config(s.vae.config)
        te1, te2 = (type(m)(m.config) for m in (s.text_encoder, s.text_encoder_2))
        enc = type(models.image_encoder)(models.image_encoder.config)
        ppr = PositionalPerceiverResampler(models.ppr.cfg)
    return dict(unet=unet, vae=vae, te1=te1, te2=te2, enc=enc, ppr=ppr)


def image_flops(models, size: int, characters: int = 1, steps: int = 25, width: int | None = None) -> dict:
    """Counted FLOPs per stage of one image; `models` may live anywhere (only configs are read)."""
    m = meta_models(models)
    f, L, c = vae_scale_factor(m["vae"].config), TEXT_TOKENS, m["unet"].config.in_channels
    h, w = size // f, (width or size) // f
    cfg = m["ppr"].cfg
    t_img = cfg.tokens_per_character * (characters + 1)
    pooled = m["unet"].config.projection_class_embeddings_input_dim - 6 * m["unet"].config.addition_time_embed_dim
    px = m["enc"].config.image_size
    with torch.device("meta"):
        step = _count(lambda: m["unet"](torch.randn(2, c, h, w), torch.tensor(500.0),
                                        encoder_hidden_states=torch.randn(2, L + t_img, cfg.cross_attention_dim),
                                        added_cond_kwargs={"text_embeds": torch.randn(2, pooled),
                                                           "time_ids": torch.randn(2, 6)},
                                        cross_attention_kwargs={"ip_scale": torch.full((2,), 0.8)}))
        ids = torch.zeros(1, L, dtype=torch.long)
        text = 2 * (_count(lambda: m["te1"](ids, output_hidden_states=True))
                    + _count(lambda: m["te2"](ids, output_hidden_states=True)))
        enc = _count(lambda: m["enc"](torch.randn(2 * characters, 3, px, px), output_hidden_states=True))
        feats = m["enc"].config.hidden_size
        ppr = 2 * _count(lambda: m["ppr"](torch.randn(characters, cfg.id_dim), torch.randn(characters, 257, feats),
                                          torch.randn(characters, 257, feats)))
        vae = _count(lambda: m["vae"].decode(torch.randn(1, c, h, w)))
    return {"encoders": enc, "ppr": ppr, "text": text, "unet_step": step, "denoise": steps * step, "vae": vae}


def weight_bytes(models, precision: str = "fp16", vae_precision: str = "fp32") -> dict:
    """Bytes of parameters each model keeps resident at the given precisions (counted on meta copies)."""
    size = {"fp32": 4, "fp16": 2, "bf16": 2}
    m = meta_models(models)
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    out = {k: count(m[k]) * size[precision] for k in ("unet", "te1", "te2", "enc", "ppr")}
    out["vae"] = count(m["vae"]) * size[vae_precision]
    out["total"] = sum(out.values())
    return out


def achieved(flops: dict, stage_seconds: dict, device_name: str | None) -> dict:
    """TFLOP/s per timed stage and, where the device's peak is known, % of its dense fp16 peak."""
    peak = peak_tflops(device_name)
    out: dict = {"fp16_peak_tflops": peak, "tflops_per_s": {}, "pct_fp16_peak": {}}
    for stage, sec in stage_seconds.items():
        n = sum(flops.get(s, 0) for s in stage.split("+"))
        if n and sec > 0:
            out["tflops_per_s"][stage] = n / sec / 1e12
            if peak:
                out["pct_fp16_peak"][stage] = 100.0 * n / sec / 1e12 / peak
    return out


def main(argv=None) -> dict:
    ap = argument_parser("python -m benchmarks.flops", __doc__)
    ap.add_argument("--weights", default="random-full", help="random-full | demo | a weights folder")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--characters", type=int, default=1, choices=(1, 2, 3))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    ap.add_argument("--vae-precision", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args(argv)
    if a.weights == "random-full":
        from storymaker_serve.export.random_models import random_full_models

        models = random_full_models("meta")
    else:
        from storymaker_serve.benchmarks.run import load_weights

        models = load_weights(a.weights)
    f = image_flops(models, a.size, a.characters, a.steps)
    w = weight_bytes(models, a.precision, a.vae_precision)
    print(json.dumps({"weights": a.weights, "size": a.size, "characters": a.characters, "steps": a.steps, **f,
                      "weight_bytes": w}))
    for k, v in f.items():
        print(f"{k:>10}: {v / 1e9:12.2f} GFLOP")
    print(", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in w.items())
          + f" of weights ({a.precision}, VAE {a.vae_precision})")
    return {**f, "weight_bytes": w}


if __name__ == "__main__":
    main()
