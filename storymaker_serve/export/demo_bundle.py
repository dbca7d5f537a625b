"""Write the tiny random StoryMaker "demo bundle" in the real on-disk formats.

`python -m export.demo_bundle OUT` writes, deterministically from a seed, every
weight a user brings, in the layout `runtime.loaders.WeightsLayout` reads:

    OUT/sdxl/            diffusers SDXL folder (UNet text_time, 2 text encoders + generated
                         CLIP BPE tokenizers, VAE, EulerDiscrete scheduler config)
    OUT/mask.bin         torch.save({"image_proj_model": ..., "ip_adapter": ...}), release keys
    OUT/image_encoder/   transformers CLIPVisionModelWithProjection folder
    OUT/buffalo_l/       det_10g.onnx (SCRFD I/O: 9 outputs) + w600k_r50.onnx (112x112 -> 512)
    OUT/controlnet/      diffusers SDXL ControlNet folder

`python -m export.demo_bundle --full --out OUT` writes the same layout at the RELEASED
sizes (SDXL base 2.6 B UNet, CLIP-L + bigG text encoders, SDXL VAE, StoryMaker
mask.bin with 140 processors of rank-128 LoRA and the released resampler, CLIP
ViT-H/14), seeded random weights, as a user's download looks: the SDXL folder holds
only the `fp16` variant files (`*.fp16.safetensors`; `--fp32` adds the default fp32
files), mask.bin is fp16, the image encoder fp32 (as h94/IP-Adapter ships it);
`--controlnet` adds a full-size SDXL ControlNet (fp16 variant). One model is in
memory at a time. Not part of CI; disk and time are in docs/export.md.

Tiny bundle sizes are shrunk except where code or formats hard-code them: 224x224 CLIP input
with patch 14 (257 tokens), ArcFace 512-d, 77 text tokens, 4 + 16 = 20 tokens per
character, 3 position rows, VAE downsampling 8, head dim 64 in the resampler, the
SDXL UNet block structure (text_time embedding, two text encoders whose widths add
up to cross_attention_dim). Images from this bundle are noise; it exists so that
every loader, exporter and server path runs for real on a CPU.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from storymaker_serve.export.demo_faces import write_buffalo_l
from storymaker_serve.export.random_models import BIGG_TEXT, CLIP_L_TEXT, SDXL_VAE
from storymaker_serve.export.sdxl_config import CLIP_VIT_H14, SDXL_UNET
from storymaker_serve.export.tokenizer_gen import write_clip_tokenizer
from storymaker_serve.runtime.adapter import build_processors
from storymaker_serve.runtime.cli import argument_parser, configure_logging
from storymaker_serve.runtime.ppr import PositionalPerceiverResampler, PPRConfig

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
    encs = []
    for i, (sub, pad,
            cls) in enumerate([("", "<|endoftext|>", CLIPTextModel), ("_2", "!", CLIPTextModelWithProjection)]):
        n_vocab = write_clip_tokenizer(root / f"tokenizer{sub}", pad_token=pad)
        cfg = CLIPTextConfig(vocab_size=n_vocab, hidden_size=TE_WIDTH, intermediate_size=2 * TE_WIDTH,
                             num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                             projection_dim=TE_WIDTH, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1,
                             pad_token_id=0 if i else n_vocab - 1, hidden_act="gelu" if i else "quick_gelu")
        encs.append(cls(cfg).eval())
    return encs


def _sdxl(root: Path) -> object:
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
    ppr = PositionalPerceiverResampler(PPRConfig(cross_attention_dim=D, clip_dim=CLIP_WIDTH))
    _perturb_(ppr, ("pos_embed", "bg_embed"), 0.5)
    procs = nn.ModuleList(build_processors(unet, rank=8, lora_scale=1.0, ip_scale=1.0).values())
    _perturb_(procs, ("up.weight",), 0.05)
    torch.save({"image_proj_model": ppr.state_dict(), "ip_adapter": procs.state_dict()}, root / "mask.bin")


def _image_encoder(root: Path) -> None:
    cfg = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_attention_heads=2,
                           num_hidden_layers=3, image_size=224, patch_size=14, projection_dim=64, hidden_act="gelu")
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(str(root / "image_encoder"), safe_serialization=True)


def _controlnet(root: Path, unet) -> None:
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    _perturb_(cn, ("controlnet_down_blocks", "controlnet_mid_block"), 0.02)  # zero convs -> small random
    cn.save_pretrained(str(root / "controlnet"), safe_serialization=True)


def write_demo_bundle(out: Path | str, seed: int = 0) -> Path:
    """Write the bundle to `out` (idempotent: an existing complete bundle with the same seed is kept)."""
    out = Path(out)
    stamp = out / "bundle.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("seed") == seed:
        log.info("demo bundle already present at %s", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    log.info("writing SDXL folder")
    unet = _sdxl(out)
    log.info("writing mask.bin")
    _mask_bin(out, unet)
    log.info("writing CLIP image encoder")
    _image_encoder(out)
    log.info("writing ControlNet")
    _controlnet(out, unet)
    log.info("writing buffalo_l ONNX files")
    write_buffalo_l(out / "buffalo_l")
    stamp.write_text(json.dumps({"kind": "storymaker-demo-bundle", "seed": seed, "cross_attention_dim": D,
                                 "clip_dim": CLIP_WIDTH, "note": "random weights; images are noise"}, indent=2))
    return out


SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _save_variant(model, folder: Path, fp32: bool) -> None:
    """The fp16 variant files (what most users download); the default fp32 files too with `fp32`."""
    if fp32:
        model.save_pretrained(str(folder), safe_serialization=True)
    model.half().save_pretrained(str(folder), safe_serialization=True, variant="fp16")


def write_full_bundle(out: Path | str, seed: int = 0, fp32: bool = False, controlnet: bool = False) -> Path:
    """Released-size random bundle (see the module doc); idempotent per (seed, fp32, controlnet) and per part:
    an interrupted run keeps the parts it finished."""
    out = Path(out)
    want = {"kind": "storymaker-full-bundle", "seed": seed, "fp32_files": fp32, "controlnet": controlnet}
    stamp = out / "bundle.json"
    if stamp.exists() and all(json.loads(stamp.read_text()).get(k) == v for k, v in want.items()):
        log.info("full-size bundle already present at %s", out)
        return out
    sd = out / "sdxl"
    sd.mkdir(parents=True, exist_ok=True)
    parts = out / ".parts.json"                 # finished parts of an interrupted run
    done = set(json.loads(parts.read_text())) if parts.exists() else set()
    t0 = time.perf_counter()

    def part(name, make):
        if name in done:
            print(f"  {name}: present", flush=True)
            return
        t = time.perf_counter()
        torch.manual_seed(seed + len(name))   # each part its own seed: a resumed run writes the same weights
        make()
        done.add(name)
        parts.write_text(json.dumps(sorted(done)))
        print(f"  {name}: {time.perf_counter() - t:.0f} s", flush=True)

    def tokenizers():
        write_clip_tokenizer(sd / "tokenizer")
        write_clip_tokenizer(sd / "tokenizer_2", pad_token="!")
        EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(str(sd / "scheduler"))
        (sd / "model_index.json").write_text(json.dumps({**SDXL_MODEL_INDEX,
                                                         "_diffusers_version": diffusers.__version__},
                                                        indent=2))

    def text_encoders():
        for sub, cls, cfg in (("", CLIPTextModel, CLIP_L_TEXT), ("_2", CLIPTextModelWithProjection, BIGG_TEXT)):
            tok = CLIPTokenizer.from_pretrained(str(sd / f"tokenizer{sub}"))   # the generated BPE's special ids
            te = cls(CLIPTextConfig(**cfg, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id)).eval()
            _save_variant(te, sd / f"text_encoder{sub}", fp32)
            del te
            gc.collect()

    def vae():
        _save_variant(AutoencoderKL(**SDXL_VAE).eval(), sd / "vae", fp32)

    def unet_and_mask_bin():
        unet = UNet2DConditionModel(**SDXL_UNET).eval()
        procs = nn.ModuleList(build_processors(unet, rank=128, lora_scale=1.0, ip_scale=1.0).values())
        _perturb_(procs, ("up.weight",), 0.002)
        ppr = PositionalPerceiverResampler(PPRConfig())
        _perturb_(ppr, ("pos_embed", "bg_embed"), 0.5)
        torch.save({"image_proj_model": {k: v.half() for k, v in ppr.state_dict().items()},
                    "ip_adapter": {k: v.half() for k, v in procs.state_dict().items()}}, out / "mask.bin")
        del procs, ppr
        gc.collect()
        if controlnet:
            cn = ControlNetModel.from_unet(unet)
            _perturb_(cn, ("controlnet_down_blocks", "controlnet_mid_block"), 0.02)
            _save_variant(cn.eval(), out / "controlnet", fp32)
            del cn
            gc.collect()
        _save_variant(unet, sd / "unet", fp32)

    def image_encoder():
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H14)).eval()
        enc.save_pretrained(str(out / "image_encoder"), safe_serialization=True)

    print(f"full-size random bundle -> {out} (one model in memory at a time)", flush=True)
    part("tokenizers+scheduler", tokenizers)
    part("text_encoders", text_encoders)
    part("vae", vae)
    part("unet+mask.bin" + ("+controlnet" if controlnet else ""), unet_and_mask_bin)
    part("image_encoder", image_encoder)
    part("buffalo_l", lambda: write_buffalo_l(out / "buffalo_l"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    stamp.write_text(json.dumps({**want, "disk_bytes": size, "seconds": round(time.perf_counter() - t0, 1),
                                 "note": "random weights at the released sizes; images are noise"}, indent=2))
    parts.unlink()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argument_parser("python -m export.demo_bundle", __doc__)
    ap.add_argument("out", type=Path, nargs="?", help="folder to write the bundle into")
    ap.add_argument("--out", dest="out_flag", type=Path, help="the same, as a flag")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--full", action="store_true", help="released sizes (about 12 GB on disk; one model in memory at "
                                                        "a time, peak about 11 GB)")
    ap.add_argument("--fp32", action="store_true", help="--full: also the default fp32 SDXL files (+13 GB)")
    ap.add_argument("--controlnet", action="store_true", help="--full: add a full-size SDXL ControlNet (+2.5 GB)")
    args = ap.parse_args(argv)
    configure_logging(args)
    out = args.out_flag or args.out
    if out is None:
        ap.error("give the output folder (OUT or --out OUT)")
    if (args.fp32 or args.controlnet) and not args.full:
        ap.error("--fp32 and --controlnet apply to --full")
    if args.full:
        path = write_full_bundle(out, args.seed, args.fp32, args.controlnet)
    else:
        path = write_demo_bundle(out, args.seed)
    print(f"{'full-size' if args.full else 'demo'} bundle written to {path}")


if __name__ == "__main__":
    main()
