"""Story files: characters once, a list of frame prompts; outputs PNGs, a contact sheet and settings JSON.

A story YAML (paths relative to the file) looks like:

    defaults: {width: 960, height: 1280, steps: 25, guidance: 7.5, ip_scale: 0.8, seed: 42,
               negative_prompt: "bad quality"}
    characters:
      - {name: man, photo: man.png, mask: man_mask.png, face: man.face.json}   # face optional
      - {name: woman, photo: woman.png, mask: woman_mask.png}
      - {name: b, photo: two.jpg, mask: two_mask.png, mask_channel: 1}  # colour-coded mask: channel 1
    frames:
      - prompt: "a man and a woman walking in a park"
      - {prompt: "the man in a cafe", characters: [man], cloth: {man: coat.png}, seed: 7}
      - {prompt: "...", pose: pose.png, controlnet_scale: 0.8}
      - {prompt: "...", identity_only: true}          # or interpolation: 0.5 (two characters)

Character tokens are computed once per distinct (characters, cloth, mode) and
reused across frames, as the serving path does.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from storymaker_serve.runtime.errors import InputError

log = logging.getLogger(__name__)
FRAME_KEYS = {"prompt", "negative_prompt", "steps", "guidance", "width", "height", "seed", "ip_scale", "pose",
              "controlnet_scale", "characters", "cloth", "identity_only", "interpolation"}
OPTION_KEYS = {"negative_prompt", "steps", "guidance", "width", "height", "seed", "ip_scale", "controlnet_scale"}


@dataclass
class Frame:
    prompt: str
    options: dict = field(default_factory=dict)   # GenerateOptions fields
    characters: list[str] | None = None           # subset by name, default all
    cloth: dict[str, str] = field(default_factory=dict)
    pose: str | None = None
    identity_only: bool = False
    interpolation: float | None = None


@dataclass
class Story:
    characters: list[dict]    # {name, photo, mask, face?}; paths absolute
    frames: list[Frame]
    defaults: dict

    @classmethod
    def load(cls, path: Path | str) -> Story:
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise InputError(f"story file {path} not found") from None
        base = path.parent
        rel = lambda p: str((base / p).resolve()) if p is not None else None
        chars = []
        for i, c in enumerate(doc.get("characters") or []):
            if "photo" not in c or "mask" not in c:
                raise InputError(f"{path}: character {i + 1} needs 'photo' and 'mask'")
            chars.append({"name": c.get("name", f"character{i + 1}"), "photo": rel(c["photo"]),
                          "mask": rel(c["mask"]), "face": rel(c.get("face")), "mask_channel": c.get("mask_channel", 0)})
        frames = []
        for i, f in enumerate(doc.get("frames") or []):
            f = {"prompt": f} if isinstance(f, str) else dict(f)
            unknown = set(f) - FRAME_KEYS
            if unknown:
                raise InputError(f"{path}: frame {i + 1} has unknown keys {sorted(unknown)}; allowed: "
                                 f"{sorted(FRAME_KEYS)}")
            frames.append(Frame(prompt=f.get("prompt", ""), options={k: f[k] for k in OPTION_KEYS & set(f)},
                                characters=f.get("characters"),
                                cloth={k: rel(v) for k, v in (f.get("cloth") or {}).items()},
                                pose=rel(f.get("pose")), identity_only=bool(f.get("identity_only", False)),
                                interpolation=f.get("interpolation")))
        if not chars or not frames:
            raise InputError(f"{path}: a story needs at least one character and one frame")
        defaults = doc.get("defaults") or {}
        unknown = set(defaults) - OPTION_KEYS
        if unknown:
            raise InputError(f"{path}: unknown defaults {sorted(unknown)}; allowed: {sorted(OPTION_KEYS)}")
        return cls(chars, frames, defaults)


def contact_sheet(refs: list[Image.Image], frames: list[np.ndarray], captions: list[str],
                  cell: int = 256) -> Image.Image:
    """Row 1: the characters' reference crops; then the frames, 3 per row, with their prompts."""
    cols = max(3, len(refs))
    rows = 1 + (len(frames) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 20)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(refs):
        sheet.paste(im.resize((cell, cell)), (i * cell, 0))
    for i, (f, cap) in enumerate(zip(frames, captions)):
        im = Image.fromarray(f)
        im.thumbnail((cell, cell))
        x, y = (i % cols) * cell, (1 + i // cols) * (cell + 20)
        sheet.paste(im, (x, y))
        draw.text((x + 4, y + im.height + 4), cap[:40], fill="black")
    return sheet


def run_story(pipe, story: Story, out: Path, overrides: dict | None = None, progress=print) -> list[Path]:
    """Generate every frame of `story` with `pipe` (a StoryMakerPipeline); write PNGs, sheet, settings."""
    from storymaker_serve.runtime.characters import Character
    from storymaker_serve.runtime.cli import step_progress
    from storymaker_serve.runtime.pipeline import GenerateOptions
    from storymaker_serve.runtime.preprocess import character_image, decode_image

    out.mkdir(parents=True, exist_ok=True)
    by_name = {c["name"]: c for c in story.characters}
    token_cache: dict = {}
    images, paths, settings = [], [], []
    for i, fr in enumerate(story.frames):
        names = fr.characters or list(by_name)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InputError(f"frame {i + 1}: unknown characters {missing}; the story defines {list(by_name)}")
        key = (tuple(names), tuple(sorted(fr.cloth.items())), fr.identity_only, fr.interpolation)
        if key not in token_cache:
            chars = [Character.load(by_name[n]["photo"], by_name[n]["mask"], by_name[n]["face"], fr.cloth.get(n), n,
                                    by_name[n].get("mask_channel", 0)) for n in names]
            token_cache[key] = pipe.encode_characters(chars, fr.identity_only, fr.interpolation)
        opts = GenerateOptions(prompt=fr.prompt, **{**story.defaults, **fr.options, **(overrides or {})})
        if fr.pose:
            opts.pose_image = decode_image(fr.pose, f"frame {i + 1} pose")
        img = pipe.generate(opts, token_cache[key], step_callback=step_progress(f"frame {i + 1}/{len(story.frames)}"))
        p = out / f"frame_{i + 1:02d}.png"
        Image.fromarray(img).save(p)
        images.append(img)
        paths.append(p)
        s = {k: v for k, v in asdict(opts).items() if k != "pose_image"}
        settings.append({**s, "characters": names, "cloth": fr.cloth, "pose": fr.pose,
                         "identity_only": fr.identity_only, "interpolation": fr.interpolation, "file": p.name})
        progress(f"frame {i + 1}/{len(story.frames)}: {p}  ({fr.prompt[:50]})")
    refs = [character_image(ch.photo, ch.mask, ch.name) for ch in
            (Character.load(c["photo"], c["mask"], None, None, c["name"],
                            c.get("mask_channel", 0)) for c in story.characters)]
    contact_sheet(refs, images, [f["file"] + ": " + f["prompt"] for f in settings]).save(out / "contact_sheet.png")
    (out / "settings.json").write_text(json.dumps({"characters": story.characters, "frames": settings}, indent=2))
    return paths
