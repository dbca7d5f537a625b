"""Per-component model loading for `export.build`: only the weights one component needs, dropped before the next."""
from __future__ import annotations

import ctypes
import gc

from storymaker_serve.export import components as C
from storymaker_serve.runtime.adapter import attach_storymaker, fuse_lora
from storymaker_serve.runtime.denoise import VAEDecode
from storymaker_serve.runtime.loaders import (
    load_controlnet,
    load_image_encoder,
    load_mask_bin,
    load_ppr,
    load_sdxl_part,
)


class Stage:
    """Loads, for each component, only the weights that component needs, and drops them before the next: the
    full-size UNet is 11.6 GB in fp32, so the build never holds two UNets, nor a UNet beside another model. The
    specs come from the configs alone (meta device, no weights). The UNet is loaded once with the release's
    unfused LoRA processors (the parity reference), its reference outputs are computed, then its LoRA is fused in
    place (`prepare_export`) and that same model is exported."""

    def __init__(self, layout, a, prof):
        self.layout, self.a, self.prof, self._specs, self._mask = layout, a, prof, None, None

    def mask_bin(self):
        if self._mask is None:
            self._mask = load_mask_bin(self.layout.mask_bin)
        return self._mask

    def specs(self):
        if self._specs is None:
            from types import SimpleNamespace as NS

            from transformers import CLIPTokenizer

            from storymaker_serve.export.components import build_specs
            from storymaker_serve.runtime.loaders import check_compatible, sdxl_part_config
            from storymaker_serve.runtime.ppr import PPRConfig
            from storymaker_serve.runtime.weights import image_encoder_config

            cfg = lambda part: sdxl_part_config(self.layout.sdxl, part, self.layout.sdxl_config)
            base = self.layout.sdxl if self.layout.sdxl.is_dir() else self.layout.sdxl_config
            unet = cfg("unet")
            ppr = PPRConfig.from_state_dict(self.mask_bin()[0])
            clip = image_encoder_config(self.layout.image_encoder)
            check_compatible(unet.cross_attention_dim, ppr, clip.hidden_size, self.layout.mask_bin,
                             self.layout.image_encoder)
            sdxl = NS(unet=NS(config=unet), vae=NS(config=cfg("vae")),
                      text_encoder=NS(config=cfg("text_encoder")), text_encoder_2=NS(config=cfg("text_encoder_2")),
                      tokenizer=CLIPTokenizer.from_pretrained(str(base / "tokenizer")),
                      tokenizer_2=CLIPTokenizer.from_pretrained(str(base / "tokenizer_2")))
            self._specs = build_specs(NS(sdxl=sdxl, ppr=NS(cfg=ppr), controlnet=self.layout.controlnet), self.prof)
        return self._specs

    def component(self, name: str):
        """Component(spec, graph, reference) for `name`, loaded now; drop it (and call release()) when done."""
        spec = self.specs()[name]
        part = lambda p: load_sdxl_part(self.layout.sdxl, p, self.layout.sdxl_config, self.layout.style_loras or ())
        print(f"  loading {name} weights ...", flush=True)
        if name == "clip_vision":
            enc = load_image_encoder(self.layout.image_encoder)
            return C.Component(spec, C.ClipVisionGraph(enc).eval(), C.ClipVisionReference(enc).eval())
        if name == "ppr":
            g = C.PPRGraph(load_ppr(self.mask_bin()[0], str(self.layout.mask_bin))).eval()
            return C.Component(spec, g, g)
        if name in ("text_encoder", "text_encoder_2"):
            g = C.TextEncoderGraph(part(name), name == "text_encoder_2").eval()
            return C.Component(spec, g, g)
        if name == "unet":
            unet = attach_storymaker(part("unet").eval(), self.mask_bin()[1], lora_scale=self.a.lora_scale, fuse=False,
                                     source=str(self.layout.mask_bin))
            self._mask = None        # 1.7 GB at full size, copied into the processors: not held through the export
            g = C.UNetGraph(unet).eval()

            def fuse():          # the release's processors -> LoRA folded into the same weights (no second UNet)
                unet.set_attn_processor(fuse_lora(unet, dict(unet.attn_processors), self.a.lora_scale))

            return C.Component(spec, g, g, prepare_export=fuse)
        if name == "vae_decoder":
            g = VAEDecode(part("vae")).eval()
            return C.Component(spec, g, g)
        if name == "controlnet":
            g = C.ControlNetGraph(load_controlnet(self.layout.controlnet)).eval()
            return C.Component(spec, g, g)
        raise KeyError(name)

    def release(self) -> None:
        """Drop what the next component does not need (the UNet's mask.bin LoRA) and return memory to the OS."""
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # glibc keeps freed arenas otherwise; RSS would not fall
        except OSError:
            pass
