"""Reference-image preprocessing, exactly as StoryMaker's release does it.

Per character (contract "Reference extraction"): crop photo and mask to the
bounding rectangle of all external contours of `mask[:,:,0]`; soft-composite
the crop over white with a 5x5 Gaussian-blurred mask; resize to 224x224 with
`Image.resize((224, 224))`, Pillow's default filter (bicubic), as the release. The face image is
`insightface.utils.face_align.norm_crop` of the
ORIGINAL photo at 224. Both go through `CLIPImageProcessor()` defaults (the
PIL implementation, which needs no torchvision). A cloth image replaces the
character crop, resized the same way without compositing. Decoded images are
bounded in pixels so a decompression bomb is refused before it is decoded.
"""
from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from insightface.utils import face_align
from PIL import Image, ImageOps
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from storymaker_serve.runtime.errors import InputError

if TYPE_CHECKING:
    import torch

CHAR_SIZE = 224
MAX_PIXELS = 4096 * 4096
MAX_SIDE = 8192           # OpenCV's remap (face alignment) takes at most 32767 per side; the detector resizes
MIN_SIDE = 16
MAX_ASPECT = 8.0          # longer side / shorter side: a 6400x8 strip is no photo and breaks the detector's resize


ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"%!PS", "EPS/PostScript"),
               (b"\xc5\xd0\xd3\xc6", "EPS/PostScript"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"), (b"<?xml", "XML/SVG"), (b"<svg", "SVG"))


def sniff_format(head: bytes) -> str:
    """The container format from the first bytes (never handing them to a decoder)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for sig, name in _SIGNATURES if head.startswith(sig)), "unknown")


def decode_image(data: bytes | str | Path | np.ndarray | Image.Image, name: str = "image", mode: str = "RGB",
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/WEBP bytes or a file to uint8 HxWx3 (mode RGB), upright, with a pixel cap.

    Untrusted uploads meet an allow-list first (by signature: other formats, e.g. EPS, which Pillow hands to
    Ghostscript, are refused by name before any decoder sees them); the pixel cap is checked from the header
    before decoding (decompression bombs); EXIF orientation is applied, so a phone photo and a mask drawn on
    it as displayed line up."""
    if isinstance(data, np.ndarray):
        return data
    if isinstance(data, Image.Image):
        return np.array(data.convert(mode))
    if isinstance(data, (str, Path)):
        if not Path(data).exists():
            raise InputError(f"{name}: file {data} not found")
        data = Path(data).read_bytes()
    fmt = sniff_format(bytes(data[:16]))
    if fmt == "unknown":
        raise InputError(f"{name}: cannot decode image (not {', '.join(ALLOWED_FORMATS)}); send PNG, JPEG or WEBP "
                         "bytes")
    if fmt not in ALLOWED_FORMATS:
        raise InputError(f"{name}: {fmt} images are not accepted; send {', '.join(ALLOWED_FORMATS)}")
    try:
        im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        w, h = im.size
        if w * h > max_pixels:
            raise InputError(f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels}; downscale it first")
        check_shape(w, h, name)
        return np.array(ImageOps.exif_transpose(im).convert(mode))
    except InputError:
        raise
    except Exception as e:  # PIL raises many types for undecodable input
        raise InputError(f"{name}: cannot decode image ({type(e).__name__}: {e}); "
                         "send PNG, JPEG or WEBP bytes") from None


def check_shape(width: int, height: int, name: str = "image") -> None:
    """Each side within MIN_SIDE..MAX_SIDE and the aspect ratio at most MAX_ASPECT (checked from the header)."""
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InputError(f"{name}: {width}x{height} pixels; each side must be {MIN_SIDE} to {MAX_SIDE} pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(f"{name}: {width}x{height} pixels has an aspect ratio over {MAX_ASPECT:g}:1; crop it to the "
                         "character first")


def mask_bbox(mask: np.ndarray, name: str = "mask") -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends: bounding rectangle of all external contours of mask[:,:,0]."""
    m = mask[:, :, 0] if mask.ndim == 3 else mask
    contours, _ = cv2.findContours(np.ascontiguousarray(m), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise InputError(f"{name}: mask is empty (no white pixels in channel 0); give a mask that covers the "
                         "character, or, for a colour-coded multi-person mask, pick the character's channel "
                         "with mask_channel")
    rects = np.array([cv2.boundingRect(c) for c in contours])  # (k, 4): x, y, w, h
    return (int(rects[:, 0].min()), int(rects[:, 1].min()),
            int((rects[:, 0] + rects[:, 2]).max()), int((rects[:, 1] + rects[:, 3]).max()))


def release_resize(im: Image.Image) -> Image.Image:
    """224x224 as the release does it: `Image.resize((224, 224))` with no filter argument, i.e. Pillow's default
    for RGB images, BICUBIC (tests/test_preprocess.py pins it)."""
    return im.resize((CHAR_SIZE, CHAR_SIZE))


def character_image(photo: np.ndarray, mask: np.ndarray, name: str = "character") -> Image.Image:
    """Crop by mask, soft-composite on white, 224x224 (the release's resize: Pillow's default, bicubic)."""
    if mask.ndim == 2:
        mask = np.repeat(mask[:, :, None], 3, axis=2)
    if photo.shape[:2] != mask.shape[:2]:
        raise InputError(f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} but the photo is "
                         f"{photo.shape[1]}x{photo.shape[0]}; the mask must have the photo's size")
    x0, y0, x1, y1 = mask_bbox(mask, f"{name} mask")
    crop = photo[y0:y1, x0:x1].astype(np.float64)
    m = cv2.GaussianBlur(mask[y0:y1, x0:x1], (5, 5), 0) / 255.0
    comp = (255.0 * (1.0 - m) + m * crop).astype(np.uint8)
    return release_resize(Image.fromarray(comp))


def cloth_image(cloth: np.ndarray) -> Image.Image:
    return release_resize(Image.fromarray(cloth))


def aligned_face(photo: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """insightface norm_crop of the original photo at 224 (ArcFace template scaled by 2)."""
    return face_align.norm_crop(photo, landmark=np.asarray(kps, dtype=np.float32), image_size=CHAR_SIZE)


@functools.lru_cache(maxsize=1)
def _clip_processor():
    return CLIPImageProcessorPil()


def clip_pixels(images: list) -> torch.Tensor:
    """CLIPImageProcessor() defaults -> float32 [n, 3, 224, 224]."""
    return _clip_processor()(images=images, return_tensors="pt").pixel_values
