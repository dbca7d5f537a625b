"""Character encoding: reference photos -> StoryMaker image tokens (positive and CFG-negative).

For each character: face info (insightface or JSON), the masked character
image (or a cloth image for clothing swap), the aligned face, CLIP
`hidden_states[-2]` of both, then the Positional-aware Perceiver Resampler
over all characters at once -> `[1, 20(n+1), D]`. The negative tokens are the
resampler applied to all-zero inputs (the release's CFG). Options from the
paper's applications: identity-only (the 16 character-image tokens zeroed, the
same in the negative) and interpolation of two characters (their id, CLIP and
face features blended with weight w, giving one character).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.face import FaceInfo
from storymaker_serve.runtime.preprocess import aligned_face, character_image, clip_pixels, cloth_image, decode_image


@dataclass
class Character:
    """One character's reference inputs. Images are uint8 RGB arrays (see `Character.load`)."""

    photo: np.ndarray
    mask: np.ndarray
    face: FaceInfo | None = None
    cloth: np.ndarray | None = None
    name: str = "character"

    @classmethod
    def load(cls, photo, mask, face=None, cloth=None, name: str | None = None, mask_channel: int = 0) -> Character:
        """Decode inputs. `mask_channel` picks one character of a colour-coded mask (one character per
        RGB channel, as in multi-person segmentation maps); it becomes channel 0, which the release reads."""
        name = name or (Path(photo).stem if isinstance(photo, (str, Path)) else "character")
        face_info = face if isinstance(face, FaceInfo) or face is None else FaceInfo.from_json(face)
        m = decode_image(mask, f"{name} mask")
        if mask_channel not in (0, 1, 2):
            raise InputError(f"{name}: mask_channel must be 0, 1 or 2, got {mask_channel}")
        if mask_channel:
            m = np.repeat(m[:, :, mask_channel:mask_channel + 1], 3, axis=2)
        img = decode_image(photo, f"{name} photo")
        if face_info is not None:
            face_info.check_inside(img.shape[1], img.shape[0], f"{name} face info")
        return cls(img, m, face_info, None if cloth is None else decode_image(cloth, f"{name} cloth"), name)


@dataclass
class CharacterFeatures:
    id: torch.Tensor     # (n, 512)
    clip: torch.Tensor   # (n, 257, C) character image, CLIP hidden_states[-2]
    face: torch.Tensor   # (n, 257, C) aligned face, CLIP hidden_states[-2]


def preprocess_characters(chars: list[Character], face_analyzer=None, max_characters: int = 3):
    """-> (id [n,512] float32, character pixels [n,3,224,224], face pixels [n,3,224,224])."""
    if not 1 <= len(chars) <= max_characters:
        raise InputError(f"{len(chars)} characters given; StoryMaker supports 1 to {max_characters} per image")
    ids, char_imgs, face_imgs = [], [], []
    for c in chars:
        info = c.face
        if info is None:
            if face_analyzer is None:
                raise InputError(f"{c.name}: no face info and no buffalo_l folder; give a face JSON or a buffalo_l "
                                 "folder")
            info = face_analyzer(c.photo, c.name)
        char_imgs.append(cloth_image(c.cloth) if c.cloth is not None else character_image(c.photo, c.mask, c.name))
        face_imgs.append(aligned_face(c.photo, info.kps))
        ids.append(info.embedding)
    return torch.from_numpy(np.stack(ids)), clip_pixels(char_imgs), clip_pixels(face_imgs)


@torch.no_grad()
def clip_features(image_encoder, pixels: torch.Tensor) -> torch.Tensor:
    p = next(image_encoder.parameters())
    out = image_encoder(pixels.to(p.device, p.dtype), output_hidden_states=True)
    return out.hidden_states[-2]  # (n, 257, C) penultimate layer, as the release


def character_features(models, chars: list[Character]) -> CharacterFeatures:
    ids, char_px, face_px = preprocess_characters(chars, models.face_analyzer, models.ppr.cfg.max_characters)
    n = ids.shape[0]
    feats = clip_features(models.image_encoder, torch.cat([char_px, face_px]))  # one batch for both
    return CharacterFeatures(ids, feats[:n], feats[n:])


def interpolate(f: CharacterFeatures, weight: float) -> CharacterFeatures:
    """Blend characters 0 and 1: (1-w)*a + w*b for id, clip and face features -> one character."""
    if f.id.shape[0] != 2:
        raise InputError(f"interpolation needs exactly 2 characters, got {f.id.shape[0]}")
    mix = lambda t: ((1 - weight) * t[0] + weight * t[1])[None]
    return CharacterFeatures(mix(f.id), mix(f.clip), mix(f.face))


def encode_characters(models, chars: list[Character], identity_only: bool = False,
                      interpolation: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Characters -> (positive, negative) image tokens with the loaded models (every in-process backend)."""
    f = character_features(models, chars)
    if interpolation is not None:
        f = interpolate(f, interpolation)
    return image_tokens(models.ppr, f, identity_only)


@torch.no_grad()
def image_tokens(ppr, f: CharacterFeatures, identity_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) tokens, each (1, 20(n+1), D), in the resampler's dtype/device."""
    p = next(ppr.parameters())
    args = [t.to(p.device, p.dtype) for t in (f.id, f.clip, f.face)]
    scale = 0.0 if identity_only else 1.0
    pos = ppr(*args, clip_token_scale=scale)
    neg = ppr(*[torch.zeros_like(t) for t in args], clip_token_scale=scale)
    return pos, neg
