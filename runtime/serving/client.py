"""gRPC client for the StoryMaker Triton deployment: Python API and `python -m runtime.client` CLI.

`StoryMakerClient(url)` wraps tritonclient's gRPC client: `encode_characters`
(once per story) returns the image tokens, `generate` makes one frame (from
tokens, or from photos directly), `generate_async` returns a handle that can be
cancelled. Prompts and images travel as BYTES; message sizes are bounded on
the channel; UNAVAILABLE is retried with exponential backoff. The CLI reads a
story YAML (runtime/story.py), encodes each distinct character set once,
generates the frames (optionally several at once), prints progress per frame
and writes PNGs, a contact sheet and the settings used. With `--serve REPO` it
starts a local server on loopback for the run and stops it afterwards.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from runtime.errors import InputError, StoryMakerError
from runtime.serving.contract import MODELS, NUMPY, SAMPLING

MAX_MESSAGE = 64 << 20
OPTIONS = {p.option: p for p in SAMPLING if p.option}          # generate(**opts) keyword -> storymaker input


def _bytes(x) -> bytes:
    return x if isinstance(x, bytes) else Path(x).read_bytes()


class StoryMakerClient:
    def __init__(self, url: str = "127.0.0.1:8001", retries: int = 5, timeout_s: float = 600.0):
        import tritonclient.grpc as grpcclient

        self.g = grpcclient
        opts = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        self.client = grpcclient.InferenceServerClient(url, channel_args=opts)
        self.retries, self.timeout_s = retries, timeout_s

    def _input(self, name: str, values, model: str = "storymaker"):
        """One input, typed by the model's declaration (runtime/serving/contract.py)."""
        dtype = MODELS[model].port(name).dtype
        arr = np.asarray(values, dtype=NUMPY[dtype])
        i = self.g.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        return i

    def _call(self, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = self.client.infer(model, inputs, outputs=[self.g.InferRequestedOutput(o) for o in outputs],
                                      client_timeout=self.timeout_s)
                return {o: r.as_numpy(o) for o in outputs}
            except InferenceServerException as e:
                if "UNAVAILABLE" in str(e.status()) and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise StoryMakerError(f"{model}: {e.message()}") from None
        raise AssertionError("unreachable")

    def _character_inputs(self, characters: list[dict], identity_only=False, interpolation=None,
                          model: str = "encode_characters") -> list:
        per = lambda f: [f(c) for c in characters]
        ins = [self._input("PHOTOS", per(lambda c: _bytes(c["photo"])), model),
               self._input("MASKS", per(lambda c: _bytes(c["mask"])), model)]
        for key, name in (("cloth", "CLOTHS"), ("face", "FACE_INFO")):
            if any(c.get(key) for c in characters):
                ins.append(self._input(name, per(lambda c: _bytes(c[key]) if c.get(key) else b""), model))
        if any(c.get("mask_channel") for c in characters):
            ins.append(self._input("MASK_CHANNELS", per(lambda c: c.get("mask_channel", 0)), model))
        if identity_only:
            ins.append(self._input("IDENTITY_ONLY", [True], model))
        if interpolation is not None:
            ins.append(self._input("INTERPOLATION", [interpolation], model))
        return ins

    def encode_characters(self, characters: list[dict], identity_only=False, interpolation=None):
        """characters: [{photo, mask, cloth?, face?, mask_channel?}] (paths or bytes) -> (tokens, negative tokens)."""
        out = self._call("encode_characters", self._character_inputs(characters, identity_only, interpolation),
                         ["IMAGE_TOKENS", "NEG_IMAGE_TOKENS"])
        return out["IMAGE_TOKENS"], out["NEG_IMAGE_TOKENS"]

    def _frame_inputs(self, prompt: str, tokens=None, characters=None, negative_prompt=None, pose=None, **opts) -> list:
        ins = [self._input("PROMPT", [prompt.encode()])]
        if negative_prompt is not None:
            ins.append(self._input("NEGATIVE_PROMPT", [negative_prompt.encode()]))
        if tokens is not None:
            ins += [self._input("IMAGE_TOKENS", tokens[0]), self._input("NEG_IMAGE_TOKENS", tokens[1])]
        elif characters:
            ins += self._character_inputs(characters, model="storymaker")
        if pose is not None:
            ins.append(self._input("POSE", [_bytes(pose)]))
        for k, v in opts.items():
            if v is None:
                continue
            if k not in OPTIONS:
                raise InputError(f"unknown option {k}; known: {sorted(OPTIONS)}")
            ins.append(self._input(OPTIONS[k].name, [v]))
        return ins

    def generate(self, prompt: str, tokens=None, characters=None, **opts) -> tuple[np.ndarray, dict]:
        """One frame -> (uint8 image [H, W, 3], {"truncated": bool, "png": bytes})."""
        out = self._call("storymaker", self._frame_inputs(prompt, tokens, characters, **opts), ["IMAGE", "PNG", "TRUNCATED"])
        return out["IMAGE"], {"truncated": bool(out["TRUNCATED"][0]), "png": bytes(out["PNG"][0])}

    def generate_async(self, prompt: str, callback, tokens=None, characters=None, **opts):
        """Start a frame; `callback(result, error)` runs when it ends. Returns a handle with `.cancel()`."""
        return self.client.async_infer("storymaker", self._frame_inputs(prompt, tokens, characters, **opts), callback,
                                       outputs=[self.g.InferRequestedOutput("IMAGE")], client_timeout=self.timeout_s)


def run_story_remote(client: StoryMakerClient, story, out: Path, overrides: dict, concurrency: int = 1,
                     progress=print) -> list[Path]:
    from runtime.characters import Character
    from runtime.preprocess import character_image
    from runtime.story import contact_sheet

    out.mkdir(parents=True, exist_ok=True)
    by_name = {c["name"]: c for c in story.characters}
    cache = {}
    jobs = []
    for i, fr in enumerate(story.frames):
        names = fr.characters or list(by_name)
        key = (tuple(names), tuple(sorted(fr.cloth.items())), fr.identity_only, fr.interpolation)
        if key not in cache:            # each distinct character set is encoded once per story
            chars = [{**by_name[n], "cloth": fr.cloth.get(n)} for n in names]
            cache[key] = client.encode_characters(chars, fr.identity_only, fr.interpolation)
            progress(f"encoded characters {', '.join(names)}" + (" (cloth swap)" if fr.cloth else ""))
        opts = {**story.defaults, **fr.options, **overrides}
        jobs.append((i, fr, names, cache[key], opts))

    def one(job):
        i, fr, names, tok, opts = job
        img, info = client.generate(fr.prompt, tokens=tok, pose=fr.pose, **opts)
        p = out / f"frame_{i + 1:02d}.png"
        p.write_bytes(info["png"])
        progress(f"frame {i + 1}/{len(jobs)}: {p}  ({fr.prompt[:50]})" + ("  [prompt truncated to 77 tokens]" if info["truncated"] else ""))
        return i, img, p, {**opts, "prompt": fr.prompt, "characters": names, "cloth": fr.cloth, "pose": fr.pose,
                           "identity_only": fr.identity_only, "interpolation": fr.interpolation, "file": p.name}

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as ex:
        results = sorted(ex.map(one, jobs))
    refs = [character_image(ch.photo, ch.mask, ch.name) for ch in
            (Character.load(c["photo"], c["mask"], None, None, c["name"], c.get("mask_channel", 0)) for c in story.characters)]
    contact_sheet(refs, [r[1] for r in results], [f"{r[3]['file']}: {r[3]['prompt']}" for r in results]).save(out / "contact_sheet.png")
    (out / "settings.json").write_text(json.dumps({"characters": story.characters, "frames": [r[3] for r in results]},
                                                  indent=2, default=str))
    return [r[2] for r in results]


def main(argv=None) -> int:
    from runtime.story import Story

    ap = argparse.ArgumentParser(prog="python -m runtime.client", description=__doc__.split("\n\n")[0])
    ap.add_argument("story", type=Path, help="story YAML (see runtime/story.py)")
    ap.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    ap.add_argument("--serve", type=Path, metavar="REPO", help="start a local tritonserver on REPO for this run")
    ap.add_argument("--out", type=Path, default=Path("out/story"))
    ap.add_argument("--concurrency", type=int, default=1, help="frames generated at once")
    for name, typ in (("steps", int), ("width", int), ("height", int), ("seed", int), ("guidance", float), ("ip-scale", float)):
        ap.add_argument(f"--{name}", type=typ)
    a = ap.parse_args(argv)
    overrides = {k: v for k, v in {"steps": a.steps, "width": a.width, "height": a.height, "seed": a.seed,
                                   "guidance": a.guidance, "ip_scale": a.ip_scale}.items() if v is not None}
    server = None
    try:
        story = Story.load(a.story)
        if a.serve:
            from runtime.serving.launcher import TritonServer

            print(f"starting tritonserver on {a.serve} (loopback) ...", flush=True)
            server = TritonServer(a.serve).start()
            a.url = server.url
            print(f"server ready at {a.url}", flush=True)
        paths = run_story_remote(StoryMakerClient(a.url), story, a.out, overrides, a.concurrency,
                                 progress=lambda s: print(s, flush=True))
    except StoryMakerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
            print("server stopped", flush=True)
    print(f"wrote {len(paths)} frame(s), contact_sheet.png and settings.json to {a.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
