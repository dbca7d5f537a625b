"""Few-step distillation LoRAs (SDXL-Lightning, Hyper-SD, LCM-LoRA, DMD2, TCD): recognised by their published file
names (or a kohya file's `ss_output_name`), with the sampler settings their authors recommend.

A few-step LoRA is fused like any style LoRA (`--lora FILE[:SCALE]`, kohya or diffusers keys); what it changes is
how to sample: 4-8 steps with its scheduler and timestep spacing, and guidance 0-1, so no CFG batch runs. Those
become the defaults of an in-process run and of a build (recorded in its manifest as `sampling_defaults`); a
request's, a story's or a flag's own values win. Quality with StoryMaker's image layers cannot be judged from this
table: render a story both ways with your weights (docs/performance.md shows the command).
"""
from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from storymaker_serve.runtime.errors import WeightsError

# (name pattern, settings); {n}: the step count read from the name
RECOMMENDED = (
    (r"lightning.*?(\d+)[-_ ]?steps?", {"scheduler": "euler", "timestep_spacing": "trailing", "guidance": 0.0}),
    (r"hyper-?sdxl.*?(\d+)[-_ ]?steps?.*cfg", {"scheduler": "ddim", "timestep_spacing": "trailing", "guidance": 5.0}),
    (r"hyper-?sdxl.*?(\d+)[-_ ]?steps?", {"scheduler": "ddim", "timestep_spacing": "trailing", "guidance": 0.0}),
    (r"dmd2.*?(\d+)[-_ ]?steps?", {"scheduler": "lcm", "guidance": 0.0}),
    (r"(?<![a-z])tcd(?![a-z])", {"scheduler": "tcd", "guidance": 0.0, "steps": 4}),
    (r"(?<![a-z])lcm(?![a-z])", {"scheduler": "lcm", "guidance": 1.0, "steps": 4}),
)


def lora_name(path: Path) -> str:
    """What a LoRA calls itself: a kohya file's `ss_output_name`, its folder's and its file's names (the published
    diffusers-format files are all `pytorch_lora_weights.safetensors` in a folder named after the repository)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file: the name is all there is
        meta = {}
    return f"{meta.get('ss_output_name', '')} {Path(path).parent.name} {Path(path).name}".lower()


def recommended(path: Path) -> dict:
    """The sampling settings a few-step LoRA's authors recommend ({} for any other LoRA)."""
    name = lora_name(path)
    for pattern, settings in RECOMMENDED:
        m = re.search(pattern, name)
        if m:
            steps = int(m.group(1)) if m.groups() else settings.get("steps")
            return {**settings, "steps": steps}
    return {}


def sampling_defaults(loras) -> dict:
    """The defaults a set of LoRAs implies: the few-step one's (at most one may be given)."""
    found = [(Path(p), settings) for p, _ in loras if (settings := recommended(Path(p)))]
    if len(found) > 1:
        raise WeightsError(f"{len(found)} few-step LoRAs given ({', '.join(str(p) for p, _ in found)}); fuse one")
    return found[0][1] if found else {}
