"""What every command line here shares: defaults in `--help`, `-v/--log-level`, per-step progress, and one set
of sampling flags for `runtime.generate` and `runtime.client`.

Import cost: the launcher and every `--help` import this module, so torch, diffusers and tqdm are imported inside
the functions that need them (a launcher that manages a server process never loads torch)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from storymaker_serve.examples import STORY
from storymaker_serve.runtime.sampler_names import SCHEDULERS, SPACINGS

LEVELS = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, with or without a help text (unless the text already says it)."""

    @staticmethod
    def _shows_default(action) -> bool:
        d = action.default
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._CountAction, argparse._HelpAction))
        return bool(action.option_strings) and not flag and d is not None and d is not argparse.SUPPRESS and d != []

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" not in h and self._shows_default(action):
            h += " (default: %(default)s)"
        return h.strip()

    def _format_action(self, action):
        if not action.help and self._shows_default(action):
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


# console script -> the checkout's `python -m` command it runs (pyproject.toml's [project.scripts])
SCRIPTS = {"storymaker-build": "python -m export.build", "storymaker-serve": "python -m runtime.serve",
           "storymaker-client": "python -m runtime.client", "storymaker-generate": "python -m runtime.generate",
           "storymaker-bench": "python -m benchmarks.run", "storymaker-refit": "python -m export.refit"}
# worked examples shown at the end of --help, per command
EXAMPLES = {
    "python -m export.build": ["{prog} --demo                                   # tiny random bundle, CPU, offline",
                               "{prog} --fp16 --weights WEIGHTS --out build/prod  # real weights"],
    "python -m runtime.serve": ["{prog} --repo build/prod/triton_repo            # loopback, ports 8001/8000/8002",
                                "{prog} --ngc-command build/prod                  # the NGC container's command"],
    "python -m runtime.client": ["{prog} {story} --serve build/demo/triton_repo",
                                 "{prog} story.yaml --url 10.0.0.5:8001 --concurrency 2 --out out/story"],
    "python -m runtime.generate": ["{prog} --weights WEIGHTS --story {story} --out out/story",
                                   "{prog} --weights WEIGHTS --prompt 'a man in a park' --character man.png,mask.png"],
    "python -m export.refit": ["{prog} --build build/prod --weights WEIGHTS --lora-scale 0.6"],
    "python -m benchmarks.run": ["{prog} --quick                                  # CPU smoke, demo weights"],
}


def command_name(module_prog: str) -> str:
    """How the user started this command: the console script's name when run as one, else `python -m ...`."""
    exe = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return exe if SCRIPTS.get(exe) == module_prog else module_prog


def argument_parser(prog: str, doc: str, **kw) -> argparse.ArgumentParser:
    """A parser with defaults in --help, the logging flags and worked examples; `prog` is the checkout command
    (`python -m runtime.serve`), shown as the console script's name when run as one; `doc` is the module docstring
    (first paragraph)."""
    shown = command_name(prog)
    examples = "\n".join("  " + e.format(prog=shown, story=STORY) for e in EXAMPLES.get(prog, []))
    ap = argparse.ArgumentParser(prog=shown, description=doc.strip().split("\n\n")[0], formatter_class=HelpFormatter,
                                 epilog=f"examples:\n{examples}" if examples else None, **kw)
    g = ap.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log detail: -v info, -vv debug")
    g.add_argument("--log-level", choices=LEVELS, help="log level (overrides -v; default warning)")
    return ap


def configure_logging(a: argparse.Namespace) -> int:
    """Root logging from -v/--log-level; library chatter (diffusers/transformers progress bars) stays off
    below debug. Returns the level."""
    level = getattr(logging, a.log_level.upper()) if a.log_level else \
        {0: logging.WARNING, 1: logging.INFO}.get(a.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s" if level < logging.INFO
                        else "%(levelname)s %(message)s", force=True)
    if level > logging.DEBUG:
        quiet_libraries()
    return level


def quiet_libraries() -> None:
    """Hide diffusers/transformers progress bars and info chatter; keep warnings we log."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def add_sampling_args(ap: argparse.ArgumentParser, title: str = "sampling (override the story's defaults)"):
    """The sampling flags `runtime.generate` and `runtime.client` share; defaults are GenerateOptions' (the
    release's), applied where neither the flag nor the story file sets a value."""
    from dataclasses import fields

    from storymaker_serve.runtime.pipeline import GenerateOptions

    d = {f.name: f.default for f in fields(GenerateOptions)}
    g = ap.add_argument_group(title)
    for name, typ, text in (("steps", int, "sampling steps"), ("guidance", float, "classifier-free guidance scale"),
                            ("width", int, "image width in pixels"), ("height", int, "image height in pixels"),
                            ("seed", int, "noise seed"), ("ip-scale", float, "character-image attention scale"),
                            ("controlnet-scale", float, "ControlNet residual scale (with a pose map)")):
        g.add_argument(f"--{name}", type=typ, help=f"{text} (default: the story's, else {d[name.replace('-', '_')]})")
    g.add_argument("--negative-prompt", help="negative prompt (default: the story's, else none: zero embeddings)")
    g.add_argument("--scheduler", choices=SCHEDULERS,
                   help="sampler (default: the story's, else the deployment's or the weights' default, else unipc)")
    g.add_argument("--noise-device", choices=("cpu", "cuda"),
                   help="where the seed's noise is drawn: cpu (the same images on every host) or cuda (the "
                        "StoryMaker release's images; needs a GPU)")
    g.add_argument("--timestep-spacing", choices=SPACINGS,
                   help="timestep spacing (default: the story's, else the scheduler config's; few-step LoRAs such as "
                        "SDXL-Lightning need trailing)")
    return g


COMPONENTS = (("sdxl", "SDXL base: a diffusers folder (default or fp16 files) or a .safetensors file"),
              ("mask-bin", "the StoryMaker adapter mask.bin"), ("image-encoder", "CLIP ViT-H/14 image encoder folder"),
              ("buffalo-l", "insightface buffalo_l folder"), ("controlnet", "SDXL OpenPose ControlNet folder"),
              ("sdxl-config", "config + tokenizer folder for a single-file SDXL"))


def add_component_args(ap: argparse.ArgumentParser):
    """Weights given one by one (instead of, or overriding parts of, --weights DIR); each may also be a local
    Hugging Face cache folder (models--ORG--NAME or its snapshots/REV)."""
    g = ap.add_argument_group("weights given one by one (override --weights DIR; HF cache folders accepted)")
    for name, text in COMPONENTS:
        g.add_argument(f"--{name}", type=Path, help=text)
    return g


def component_paths(a: argparse.Namespace) -> dict:
    return {n.replace("-", "_"): getattr(a, n.replace("-", "_")) for n, _ in COMPONENTS}


SAMPLING_KEYS = ("steps", "guidance", "width", "height", "seed", "ip_scale", "controlnet_scale", "negative_prompt",
                 "scheduler", "timestep_spacing", "noise_device")


def sampling_overrides(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in SAMPLING_KEYS if getattr(a, k, None) is not None}


def step_progress(desc: str):
    """A step_callback(i, n) that draws a per-step progress bar on a terminal (tqdm; silent when stderr is not
    a terminal, e.g. in logs). Call `.close()` when done."""
    from tqdm import tqdm

    state = {"bar": None}

    def cb(i: int, n: int) -> None:
        if state["bar"] is None:
            state["bar"] = tqdm(total=n, desc=desc, unit="step", leave=False, file=sys.stderr,
                                disable=None if sys.stderr.isatty() else True)
        state["bar"].update(1)
        if i + 1 == n:
            state["bar"].close()
            state["bar"] = None

    return cb
