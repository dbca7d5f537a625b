"""Full-size StoryMaker models with seeded random weights, for timing only (`--weights random-full`).

Speed does not depend on weight values, so the released sizes built with
random weights time exactly like the real model: SDXL base UNet (2.6 B
parameters) with StoryMaker's attention processors (rank-128 LoRA unfused for
the reference backend, or fused with to_k_ip/to_v_ip only), both SDXL text
encoders (CLIP ViT-L/14 text and OpenCLIP bigG text), the SDXL VAE, the CLIP
ViT-H/14 vision tower and the resampler at its released dims. Built directly
on the target device (`torch.device` context), so a GPU gets them in seconds;
`device="meta"` builds the structure without memory (tests count parameters).
Images made with these weights are noise. Tokenizers are the small generated
BPE ones (token ids stay below the real 49408-entry vocabulary).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from storymaker_serve.export.sdxl_config import CLIP_VIT_H14, SDXL_UNET
from storymaker_serve.export.tokenizer_gen import write_clip_tokenizer
from storymaker_serve.runtime.adapter import build_processors
from storymaker_serve.runtime.loaders import SDXLParts, StoryMakerModels
from storymaker_serve.runtime.ppr import PositionalPerceiverResampler, PPRConfig

SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")


def random_full_models(device: str = "cuda", dtype: torch.dtype = torch.float16, fuse: bool = True,
                       seed: int = 0, rank: int = 128):
    """StoryMakerModels of released sizes with random weights on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        procs = build_processors(unet, rank=0 if fuse else rank, lora_scale=0.8, ip_scale=0.8)
        unet.set_attn_processor(procs)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TEXT))
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H14))
        ppr = PositionalPerceiverResampler(PPRConfig())
    if device != "meta":
        for m in (unet, te1, te2, enc, ppr):
            m.to(dtype=dtype).eval()
        vae.eval()                                     # fp32: SDXL's VAE overflows in fp16
    tok_dir = Path(tempfile.mkdtemp(prefix="random-full-tokenizers-"))
    write_clip_tokenizer(tok_dir / "tokenizer")
    write_clip_tokenizer(tok_dir / "tokenizer_2", pad_token="!")
    toks = [CLIPTokenizer.from_pretrained(str(tok_dir / n)) for n in ("tokenizer", "tokenizer_2")]
    return StoryMakerModels(SDXLParts(unet, vae, te1, te2, *toks, SDXL_SCHEDULER), ppr, enc)
