"""Stories: characters once, a list of frames; one runner for every backend, writing PNGs, a contact sheet and
settings JSON.

A story YAML (paths relative to the file) looks like:

    defaults: {width: 960, height: 1280, steps: 25, guidance: 7.5, ip_scale: 0.8, seed: 42,
               negative_prompt: "bad quality", scheduler: unipc}     # scheduler: see runtime/schedulers.py
    characters:
      - {name: man, photo: man.png, mask: man_mask.png, face: man.face.json}   # face optional
      - {name: woman, photo: woman.png, mask: woman_mask.png}
      - {name: b, photo: two.jpg, mask: two_mask.png, mask_channel: 1}  # colour-coded mask: channel 1
    frames:
      - prompt: "a man and a woman walking in a park"
      - {prompt: "the man in a cafe", characters: [man], cloth: {man: coat.png}, seed: 7}
      - {prompt: "...", pose: pose.png, controlnet_scale: 0.8}
      - {prompt: "...", identity_only: true}          # or interpolation: 0.5 (two characters)

The file is checked against a schema when it is loaded (every key, type and file), so a mistake is one line that
names the file and the key. `run_story` drives any `StoryPipeline`: the in-process pipelines through
`LocalStoryMaker`, a deployment through `runtime.serving.client.RemoteStoryMaker`; both get the same checks.
Character tokens are computed once per distinct (characters, cloth, mode) and reused across frames.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pydantic
import yaml
from PIL import Image, ImageDraw

from storymaker_serve.runtime.characters import Character
from storymaker_serve.runtime.cli import step_progress
from storymaker_serve.runtime.denoise import uses_cfg
from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.pipeline import GenerateOptions
from storymaker_serve.runtime.preprocess import character_image, decode_image
from storymaker_serve.runtime.sampler_names import SCHEDULERS, SPACINGS

log = logging.getLogger(__name__)


# ---- the file format ----
class _Options(pydantic.BaseModel):
    """Sampling settings a story's defaults or a frame may set (GenerateOptions' fields)."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=False)
    negative_prompt: str | None = None
    steps: pydantic.StrictInt | None = None
    guidance: float | None = None
    width: pydantic.StrictInt | None = None
    height: pydantic.StrictInt | None = None
    seed: pydantic.StrictInt | None = None
    ip_scale: float | None = None
    controlnet_scale: float | None = None
    scheduler: Literal[SCHEDULERS] | None = None
    timestep_spacing: Literal[SPACINGS] | None = None
    noise_device: Literal["cpu", "cuda"] | None = None


OPTION_KEYS = tuple(_Options.model_fields)      # the option names a story may set, in the schema's order


class _Character(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str | None = None
    photo: str
    mask: str
    face: str | None = None
    mask_channel: int = 0


class _Frame(_Options):
    prompt: str
    pose: str | None = None
    characters: list[str] | None = None
    cloth: dict[str, str] = {}
    identity_only: bool = False
    interpolation: float | None = None


class _Story(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    defaults: _Options = _Options()
    characters: list[_Character] = pydantic.Field(min_length=1)
    frames: list[_Frame | str] = pydantic.Field(min_length=1)


def _schema_error(path: Path, e: pydantic.ValidationError) -> InputError:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if not isinstance(p, str) or p not in ("_Frame", "str"))
    got = f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else ""
    return InputError(f"{path}: {where or 'the top level'}: {err['msg']}{got}")


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
    characters: list[dict]    # {name, photo, mask, face?, mask_channel}; paths absolute
    frames: list[Frame]
    defaults: dict

    @classmethod
    def load(cls, path: Path | str) -> Story:
        """Read and check a story file; every problem is an InputError naming the file and the key."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise InputError(f"story file {path} not found") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise InputError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        if doc is None:
            raise InputError(f"{path}: the story is empty; it needs 'characters' and 'frames' (see "
                             "storymaker_serve/examples/demo_story.yaml)")
        if not isinstance(doc, dict):
            raise InputError(f"{path}: the top level must be a mapping with 'characters' and 'frames', "
                             f"not a {type(doc).__name__}")
        try:
            parsed = _Story.model_validate(doc)
        except pydantic.ValidationError as e:
            raise _schema_error(path, e) from None
        base = path.parent

        def rel(p: str | None, key: str) -> str | None:
            if p is None:
                return None
            full = (base / p).resolve()
            if not full.is_file():
                raise InputError(f"{path}: {key}: file not found: {full}")
            return str(full)

        chars = [{"name": c.name or f"character{i + 1}", "photo": rel(c.photo, f"characters.{i}.photo"),
                  "mask": rel(c.mask, f"characters.{i}.mask"), "face": rel(c.face, f"characters.{i}.face"),
                  "mask_channel": c.mask_channel} for i, c in enumerate(parsed.characters)]
        frames = []
        for i, f in enumerate(parsed.frames):
            f = _Frame(prompt=f) if isinstance(f, str) else f
            options = {k: getattr(f, k) for k in OPTION_KEYS if k in f.model_fields_set}
            frames.append(Frame(prompt=f.prompt, options=options, characters=f.characters,
                                cloth={k: rel(v, f"frames.{i}.cloth.{k}") for k, v in f.cloth.items()},
                                pose=rel(f.pose, f"frames.{i}.pose"), identity_only=f.identity_only,
                                interpolation=f.interpolation))
        defaults = {k: getattr(parsed.defaults, k) for k in OPTION_KEYS if k in parsed.defaults.model_fields_set}
        return cls(chars, frames, defaults)


# ---- running a story on any backend ----
@dataclass
class FrameResult:
    image: np.ndarray                  # uint8 [H, W, 3]
    png: bytes | None = None           # the encoded frame, where the backend made one
    truncated: bool = False            # the prompt was cut to the text encoders' 77 tokens


class StoryPipeline(Protocol):
    """What `run_story` needs from a backend."""

    def encode_characters(self, characters: list[dict], identity_only: bool, interpolation: float | None): ...

    def generate(self, opts: GenerateOptions, tokens, frame: int, frames: int, given: frozenset = frozenset()
                 ) -> FrameResult:
        """Frame number `frame` (1-based) of `frames`; `given`: the option names the story or the command line set
        (a deployment applies its own defaults to the others)."""


class LocalStoryMaker:
    """A StoryMakerPipeline (reference or torch-opt) as a StoryPipeline: characters loaded from their files here."""

    def __init__(self, pipe):
        self.pipe = pipe

    def encode_characters(self, characters: list[dict], identity_only: bool, interpolation: float | None):
        chars = [Character.load(c["photo"], c["mask"], c.get("face"), c.get("cloth"), c["name"],
                                c.get("mask_channel", 0)) for c in characters]
        return self.pipe.encode_characters(chars, identity_only, interpolation)

    def generate(self, opts: GenerateOptions, tokens, frame: int, frames: int, given: frozenset = frozenset()
                 ) -> FrameResult:
        return FrameResult(self.pipe.generate(opts, tokens, step_callback=step_progress(f"frame {frame}/{frames}")))


def _frame_plan(story: Story, i: int, fr: Frame, overrides: dict,
                base: dict) -> tuple[list[str], GenerateOptions, frozenset]:
    """The characters, the checked options and the names of the options set of frame i: the same checks for every
    backend. `base`: defaults below the story's (a few-step LoRA's scheduler, steps and guidance)."""
    by_name = {c["name"]: c for c in story.characters}
    names = fr.characters or list(by_name)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(f"frame {i + 1}: unknown characters {missing}; the story defines {list(by_name)}")
    given = {**story.defaults, **fr.options, **overrides}
    opts = GenerateOptions(prompt=fr.prompt, **{**base, **given})
    if fr.pose:
        opts.pose_image = decode_image(fr.pose, f"frame {i + 1} pose")
    opts.validate()
    return names, opts, frozenset(given)


def check_story(story: Story, overrides: dict | None = None, base: dict | None = None) -> list[tuple]:
    """Every frame's characters, checked options and set option names, before anything is loaded or sent
    (run_story does it too)."""
    return [_frame_plan(story, i, fr, overrides or {}, base or {}) for i, fr in enumerate(story.frames)]


def run_story(pipeline: StoryPipeline, story: Story, out: Path, overrides: dict | None = None, concurrency: int = 1,
              progress=print, base: dict | None = None) -> list[Path]:
    """Every frame of `story` on `pipeline`: characters encoded once per distinct set, frames generated
    `concurrency` at a time; writes frame_NN.png, contact_sheet.png and settings.json to `out`. `base`: option
    defaults below the story's (in process: a few-step LoRA's)."""
    out.mkdir(parents=True, exist_ok=True)
    by_name = {c["name"]: c for c in story.characters}
    plans = check_story(story, overrides, base)            # every frame checked before the first is made
    tokens: dict = {}
    jobs = []
    for i, (fr, (names, opts, given)) in enumerate(zip(story.frames, plans)):
        key = (tuple(names), tuple(sorted(fr.cloth.items())), fr.identity_only, fr.interpolation)
        if key not in tokens:
            chars = [{**by_name[n], "cloth": fr.cloth.get(n)} for n in names]
            tokens[key] = pipeline.encode_characters(chars, fr.identity_only, fr.interpolation)
            progress(f"encoded characters {', '.join(names)}" + (" (cloth swap)" if fr.cloth else ""))
        jobs.append((i, fr, names, opts, given, tokens[key]))
    n = len(jobs)

    def one(job):
        i, fr, names, opts, given, tok = job
        result = pipeline.generate(opts, tok, i + 1, n, given)
        p = out / f"frame_{i + 1:02d}.png"
        if result.png:
            p.write_bytes(result.png)
        else:
            Image.fromarray(result.image).save(p)
        cut = "  [prompt truncated to 77 tokens]" if result.truncated else ""
        progress(f"frame {i + 1}/{n}: {p}  ({fr.prompt[:50]}){cut}")
        settings = {k: v for k, v in asdict(opts).items() if k != "pose_image"}
        settings["unet_rows"] = opts.steps * (2 if uses_cfg(opts) else 1)    # UNet evaluations of one latent row
        return result.image, p, {**settings, "characters": names, "cloth": fr.cloth, "pose": fr.pose,
                                 "identity_only": fr.identity_only, "interpolation": fr.interpolation, "file": p.name}

    if concurrency <= 1:
        results = [one(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            results = list(ex.map(one, jobs))
    refs = [character_image(ch.photo, ch.mask, ch.name) for ch in
            (Character.load(c["photo"], c["mask"], None, None, c["name"], c.get("mask_channel", 0))
             for c in story.characters)]
    contact_sheet(refs, [r[0] for r in results],
                  [f"{r[2]['file']}: {r[2]['prompt']}" for r in results]).save(out / "contact_sheet.png")
    (out / "settings.json").write_text(json.dumps({"characters": story.characters, "frames": [r[2] for r in results]},
                                                  indent=2, default=str))
    return [r[1] for r in results]


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
