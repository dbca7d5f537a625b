"""Write the tiny random StoryMaker "demo bundle" in the real on-disk formats.

`python -m export.demo_bundle OUT` writes, deterministically from a seed, every
weight a user brings, in the layout `runtime.loaders.WeightsLayout` reads:

    OUT/sdxl/            diffusers SDXL folder (UNet text_time, 2 text encoders + generated
                         CLIP BPE tokenizers, VAE, EulerDiscrete scheduler config)
    OUT/mask.bin         torch.save({"image_proj_model": ..., "ip_adapter": ...}), release keys
    OUT/image_encoder/   transformers CLIPVisionModelWithProjection folder
    OUT/buffalo_l/       det_10g.onnx (SCRFD I/O: 9 outputs) + w600k_r50.onnx (112x112 -> 512)
    OUT/controlnet/      diffusers SDXL ControlNet folder

Sizes are shrunk except where code or formats hard-code them: 224x224 CLIP input
with patch 14 (257 tokens), ArcFace 512-d, 77 text tokens, 4 + 16 = 20 tokens per
character, 3 position rows, VAE downsampling 8, head dim 64 in the resampler, the
SDXL UNet block structure (text_time embedding, two text encoders whose widths add
up to cross_attention_dim). Images from this bundle are noise; it exists so that
every loader, exporter and server path runs for real on a CPU.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from export.tokenizer_gen import write_clip_tokenizer
from runtime.ppr import PPRConfig, PositionalPerceiverResampler

log = logging.getLogger(__name__)

TE_WIDTH = 64          # each text encoder; D = 64 + 64 = 128
D = 2 * TE_WIDTH
CLIP_WIDTH = 128       # demo CLIP vision width (real: 1280)
TIME_EMBED = 8

DEMO_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=D,
    use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=6 * TIME_EMBED + TE_WIDTH,
)
DEMO_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    sample_size=256, scaling_factor=0.13025, force_upcast=True,
)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
)


def _perturb_(module: nn.Module, names: tuple[str, ...], std: float) -> None:
    """Give zero-initialised parameters (pos/bg embeds, LoRA up, ControlNet zero convs) random values."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(s in n for s in names):
                p.normal_(0.0, std)


def _text_encoders(root: Path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encs = []
    for i, (sub, pad, cls) in enumerate([("", "<|endoftext|>", CLIPTextModel), ("_2", "!", CLIPTextModelWithProjection)]):
        n_vocab = write_clip_tokenizer(root / f"tokenizer{sub}", pad_token=pad)
        cfg = CLIPTextConfig(vocab_size=n_vocab, hidden_size=TE_WIDTH, intermediate_size=2 * TE_WIDTH,
                             num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                             projection_dim=TE_WIDTH, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1,
                             pad_token_id=0 if i else n_vocab - 1, hidden_act="gelu" if i else "quick_gelu")
        encs.append(cls(cfg).eval())
    return encs


def _sdxl(root: Path) -> "object":
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    te1, te2 = _text_encoders(root / "sdxl")
    unet = UNet2DConditionModel(**DEMO_UNET)
    vae = AutoencoderKL(**DEMO_VAE)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "sdxl" / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(root / "sdxl" / "tokenizer_2")),
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(root / "sdxl"), safe_serialization=True)
    return unet


def _mask_bin(root: Path, unet) -> None:
    from runtime.adapter import build_processors

    ppr = PositionalPerceiverResampler(PPRConfig(cross_attention_dim=D, clip_dim=CLIP_WIDTH))
    _perturb_(ppr, ("pos_embed", "bg_embed"), 0.5)
    procs = nn.ModuleList(build_processors(unet, rank=8, lora_scale=1.0, ip_scale=1.0).values())
    _perturb_(procs, ("up.weight",), 0.05)
    torch.save({"image_proj_model": ppr.state_dict(), "ip_adapter": procs.state_dict()}, root / "mask.bin")


def _image_encoder(root: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_attention_heads=2,
                           num_hidden_layers=3, image_size=224, patch_size=14, projection_dim=64, hidden_act="gelu")
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(str(root / "image_encoder"), safe_serialization=True)


def _controlnet(root: Path, unet) -> None:
    from diffusers import ControlNetModel

    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    _perturb_(cn, ("controlnet_down_blocks", "controlnet_mid_block"), 0.02)  # zero convs -> small random
    cn.save_pretrained(str(root / "controlnet"), safe_serialization=True)


def write_demo_bundle(out: Path | str, seed: int = 0) -> Path:
    """Write the bundle to `out` (idempotent: an existing complete bundle with the same seed is kept)."""
    from export.demo_faces import write_buffalo_l

    out = Path(out)
    stamp = out / "bundle.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("seed") == seed:
        log.info("demo bundle already present at %s", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    log.info("writing SDXL folder");            unet = _sdxl(out)
    log.info("writing mask.bin");               _mask_bin(out, unet)
    log.info("writing CLIP image encoder");     _image_encoder(out)
    log.info("writing ControlNet");             _controlnet(out, unet)
    log.info("writing buffalo_l ONNX files");   write_buffalo_l(out / "buffalo_l")
    stamp.write_text(json.dumps({"kind": "storymaker-demo-bundle", "seed": seed, "cross_attention_dim": D,
                                 "clip_dim": CLIP_WIDTH, "note": "random weights; images are noise"}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    from runtime.cli import argument_parser, configure_logging

    ap = argument_parser("python -m export.demo_bundle", __doc__)
    ap.add_argument("out", type=Path, help="folder to write the bundle into")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    args = ap.parse_args(argv)
    configure_logging(args)
    path = write_demo_bundle(args.out, args.seed)
    print(f"demo bundle written to {path}")


if __name__ == "__main__":
    main()
