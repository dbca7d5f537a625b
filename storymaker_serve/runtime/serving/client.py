"""Client for the StoryMaker Triton deployment (gRPC or HTTP, optional TLS): Python API and `python -m runtime.client`.

`StoryMakerClient(url)` wraps tritonclient's gRPC (default) or HTTP client: `encode_characters`
(once per story) returns the image tokens, `generate` makes one frame (from
tokens, or from photos directly), `generate_async` returns a handle that can be
cancelled. Prompts and images travel as BYTES; message sizes are bounded on
the channel; UNAVAILABLE is retried with exponential backoff. The CLI reads a
story YAML (runtime/story.py), encodes each distinct character set once,
generates the frames (optionally several at once), prints progress per frame
and writes PNGs, a contact sheet and the settings used. With `--serve REPO` it
starts a local server on loopback for the run and stops it afterwards.

Import cost: the client API needs no torch, so the story runner (which does) is imported where the CLI and
`RemoteStoryMaker` use it.
"""
from __future__ import annotations

import io
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tritonclient.utils import InferenceServerException

from storymaker_serve.runtime.cli import add_sampling_args, argument_parser, configure_logging, sampling_overrides
from storymaker_serve.runtime.errors import InputError, StoryMakerError
from storymaker_serve.runtime.serving import malloc
from storymaker_serve.runtime.serving.contract import MODELS, NUMPY, SAMPLING

if TYPE_CHECKING:
    from storymaker_serve.runtime.pipeline import GenerateOptions

MAX_MESSAGE = 64 << 20
OPTIONS = {p.option: p for p in SAMPLING if p.option}          # generate(**opts) keyword -> storymaker input


def _bytes(x) -> bytes:
    """An image or face-info input as the bytes the server decodes: bytes as they are, a path's file, a PIL image or
    a uint8 array (RGB [H, W, 3], RGBA, or a grey mask [H, W]) as lossless PNG, an insightface `Face` (or any object
    with `kps` and `embedding`) as face-info JSON."""
    if isinstance(x, bytes):
        return x
    if isinstance(x, (str, Path)):
        return Path(x).read_bytes()
    if hasattr(x, "kps") and (hasattr(x, "normed_embedding") or hasattr(x, "embedding")):
        emb = getattr(x, "normed_embedding", None)
        emb = emb if emb is not None else x.embedding
        return json.dumps({"kps": np.asarray(x.kps).tolist(), "embedding": np.asarray(emb).tolist()}).encode()
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (2, 3):
            raise InputError(f"an image array must be uint8 [H, W, 3] (RGB) or [H, W] (mask), got {x.dtype} "
                             f"{list(x.shape)}")
        x = Image.fromarray(x)
    if isinstance(x, Image.Image):
        buf = io.BytesIO()
        x.save(buf, format="PNG")
        return buf.getvalue()
    raise InputError(f"cannot send a {type(x).__name__}: give a path, bytes, a PIL image or a uint8 numpy array")


class ServerError(StoryMakerError):
    """An error the deployment answered. `code` is the gRPC/HTTP status: INVALID_ARGUMENT for a mistake in the
    request (the message starts with "invalid input:" and names the input and the fix), CANCELLED, INTERNAL (with a
    request id to find in the server log), UNAVAILABLE. A stream's errors travel as messages only (Triton's
    streaming protocol has no status per response); their code is read from the documented message prefix."""

    PREFIXES = (("invalid input:", "INVALID_ARGUMENT"), ("request cancelled", "CANCELLED"),
                ("internal error", "INTERNAL"))

    def __init__(self, model: str, message: str, status=None):
        super().__init__(f"{model}: {message}")
        self.model, self.message = model, message
        code = str(status).removeprefix("StatusCode.") if status else None
        if code in (None, "None", "400", "500"):
            code = next((c for prefix, c in self.PREFIXES if message.startswith(prefix)), code)
        self.code = code


class StoryMakerClient:
    """A Triton client for the StoryMaker models over gRPC (default) or HTTP, optionally with TLS.

    gRPC: `ssl=True` with `root_certificates` (CA bundle; default: the system's) and, for mutual TLS,
    `private_key` + `certificate_chain` (PEM files). HTTP: `ssl=True` with the same files (CA bundle, client
    key/certificate); `insecure=True` skips server-certificate verification (testing only). Cancelling a
    running request (`generate_async(...).cancel()`) needs gRPC.

    Images (photos, masks, cloths, pose maps) may be paths, bytes, PIL images or uint8 numpy arrays; face info
    may be a JSON path or bytes, or an insightface `Face`.

    `tune_malloc=True` (off by default: it changes the whole process) sets this process's glibc mmap/trim
    thresholds (runtime/serving/malloc.py) so each response's multi-megabyte buffers are reused instead of faulted
    in again: at 960x1280 that took the client's CPU per frame from 14 to 7 ms. The CLI turns it on.

    HTTP: tritonclient's HTTP client is gevent-based and cannot be shared across threads, so each thread that
    calls gets its own (frames generated several at once)."""

    def __init__(self, url: str = "127.0.0.1:8001", retries: int = 5, timeout_s: float = 600.0,
                 protocol: str = "grpc", ssl: bool = False, root_certificates: str | None = None,
                 private_key: str | None = None, certificate_chain: str | None = None, insecure: bool = False,
                 tune_malloc: bool = False):
        if protocol not in ("grpc", "http"):
            raise InputError(f"protocol {protocol!r}: use grpc or http")
        if tune_malloc:
            malloc.tune_this_process()
        self.url, self.protocol, self.retries, self.timeout_s = url, protocol, retries, timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as g

            opts = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
            self._grpc = g.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates,
                                                 private_key=private_key, certificate_chain=certificate_chain,
                                                 channel_args=opts)
        else:
            import tritonclient.http as g

            tls = {k: v for k, v in (("ca_certs", root_certificates), ("keyfile", private_key),
                                     ("certfile", certificate_chain)) if v}
            self._http_args = dict(ssl=ssl, ssl_options=tls or None, insecure=insecure,
                                   connection_timeout=timeout_s, network_timeout=timeout_s)
            self._local = threading.local()
        self.g = g

    @property
    def client(self):
        """The tritonclient client for the calling thread: one gRPC client for all (thread-safe), an HTTP client per
        thread."""
        if self.protocol == "grpc":
            return self._grpc
        if getattr(self._local, "client", None) is None:
            self._local.client = self.g.InferenceServerClient(self.url, **self._http_args)
        return self._local.client

    def wait_ready(self, timeout_s: float = 10.0, progress=None) -> None:
        """Wait until the server answers and the StoryMaker models are ready, at most `timeout_s`; raise with what
        was tried otherwise. `progress(text)` hears what it waits for."""
        kind = "gRPC" if self.protocol == "grpc" else "HTTP"
        if progress:
            progress(f"connecting to the StoryMaker server at {self.url} ({kind}, up to {timeout_s:g} s) ...")
        deadline, last = time.monotonic() + timeout_s, "no answer"
        timeout = {"client_timeout": min(2.0, timeout_s)} if self.protocol == "grpc" else {}
        while True:
            try:
                if self.client.is_server_ready(**timeout) and all(
                        self.client.is_model_ready(m, **timeout) for m in ("encode_characters", "storymaker")):
                    return
                last = "the server answers but the StoryMaker models are not ready yet"
            except (InferenceServerException, OSError, ConnectionError) as e:
                last = (e.message() if isinstance(e, InferenceServerException) else str(e)) or type(e).__name__
            except Exception as e:  # noqa: BLE001 - gevent/socket errors of the HTTP client: reported below
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise StoryMakerError(f"cannot reach a ready StoryMaker server at {self.url} ({kind}) within "
                                      f"{timeout_s:g} s: {last}. Is `python -m runtime.serve` running there, and is "
                                      f"this its {kind} port (--url HOST:PORT)?")
            time.sleep(0.25)

    def _input(self, name: str, values, model: str = "storymaker"):
        """One input, typed by the model's declaration (runtime/serving/contract.py)."""
        dtype = MODELS[model].port(name).dtype
        arr = np.asarray(values, dtype=NUMPY[dtype])
        i = self.g.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        return i

    def _call(self, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = self.client.infer(model, inputs, outputs=[self.g.InferRequestedOutput(o) for o in outputs], **kw)
                return {o: r.as_numpy(o) for o in outputs}
            except InferenceServerException as e:
                if str(e.status()) in ("StatusCode.UNAVAILABLE", "503") and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise ServerError(model, e.message(), e.status()) from None
        raise AssertionError("unreachable")

    def _character_inputs(self, characters: list[dict], identity_only=False, interpolation=None,
                          model: str = "encode_characters") -> list:
        per = lambda f: [f(c) for c in characters]
        ins = [self._input("PHOTOS", per(lambda c: _bytes(c["photo"])), model),
               self._input("MASKS", per(lambda c: _bytes(c["mask"])), model)]
        for key, name in (("cloth", "CLOTHS"), ("face", "FACE_INFO")):
            if any(c.get(key) for c in characters):
                ins.append(self._input(name, per(lambda c, key=key: _bytes(c[key]) if c.get(key) else b""), model))
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

    def _frame_inputs(self, prompt: str, tokens=None, characters=None, negative_prompt=None, pose=None,
                      model: str = "storymaker", png: bool = True, **opts) -> list:
        ins = [self._input("PROMPT", [prompt.encode()], model)]
        if not png:                                          # raw IMAGE only: no PNG encode on the server
            ins.append(self._input("ENCODE_PNG", [False], model))
        if negative_prompt is not None:
            ins.append(self._input("NEGATIVE_PROMPT", [negative_prompt.encode()], model))
        if tokens is not None:
            ins += [self._input("IMAGE_TOKENS", tokens[0], model), self._input("NEG_IMAGE_TOKENS", tokens[1], model)]
        elif characters:
            ins += self._character_inputs(characters, model=model)
        if pose is not None:
            ins.append(self._input("POSE", [_bytes(pose)], model))
        for k, v in opts.items():
            if v is None:
                continue
            if k not in OPTIONS:
                raise InputError(f"unknown option {k}; known: {sorted(OPTIONS)}")
            ins.append(self._input(OPTIONS[k].name, [v], model))
        return ins

    def generate(self, prompt: str, tokens=None, characters=None, **opts) -> tuple[np.ndarray, dict]:
        """One frame -> (uint8 image [H, W, 3], {"truncated": bool, "png": bytes}); `png=False` skips the server's
        PNG encode ("png" is then b"")."""
        out = self._call("storymaker", self._frame_inputs(prompt, tokens, characters, **opts),
                         ["IMAGE", "PNG", "TRUNCATED"])
        return out["IMAGE"], {"truncated": bool(out["TRUNCATED"][0]), "png": bytes(out["PNG"][0])}

    def generate_stream(self, prompt: str, tokens=None, characters=None, preview_every: int | None = None, **opts):
        """One frame over a gRPC stream (`storymaker_stream`): yields {"final": False, "steps_done": k, "image":
        preview [h, w, 3]} every `preview_every` steps, then {"final": True, "steps_done": n, "image": frame,
        "png": bytes, "truncated": bool}. Closing the generator early (break, .close()) cancels the request; the
        server stops its loop before the next step."""
        if self.protocol != "grpc":
            raise InputError("generate_stream needs protocol='grpc' (Triton streams over gRPC only)")
        model = "storymaker_stream"
        ins = self._frame_inputs(prompt, tokens, characters, model=model, **opts)
        if preview_every is not None:
            ins.append(self._input("PREVIEW_EVERY", [preview_every], model))
        events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: events.put((result, error)),
                                 stream_timeout=self.timeout_s)
        done = False
        try:
            self.client.async_stream_infer(model, ins, outputs=[self.g.InferRequestedOutput(o) for o in
                                                                ("IMAGE", "PNG", "TRUNCATED", "STEPS_DONE", "FINAL")])
            while not done:
                result, error = events.get(timeout=self.timeout_s)
                if error is not None:
                    msg = error.message() if isinstance(error, InferenceServerException) else str(error)
                    raise ServerError(model, msg, error.status() if isinstance(error, InferenceServerException)
                                      else None)
                done = bool(result.as_numpy("FINAL")[0])
                ev = {"final": done, "steps_done": int(result.as_numpy("STEPS_DONE")[0]),
                      "image": result.as_numpy("IMAGE")}
                if done:
                    ev.update(png=bytes(result.as_numpy("PNG")[0]), truncated=bool(result.as_numpy("TRUNCATED")[0]))
                yield ev
        finally:
            self.client.stop_stream(cancel_requests=not done)

    def generate_async(self, prompt: str, callback, tokens=None, characters=None, **opts):
        """Start a frame; `callback(result, error)` runs when it ends. Returns a handle with `.cancel()` (gRPC)."""
        if self.protocol != "grpc":
            raise InputError("generate_async with cancellation needs protocol='grpc'")
        return self.client.async_infer("storymaker", self._frame_inputs(prompt, tokens, characters, **opts), callback,
                                       outputs=[self.g.InferRequestedOutput("IMAGE")], client_timeout=self.timeout_s)


class RemoteStoryMaker:
    """A deployment as a story pipeline (runtime.story.StoryPipeline) over a StoryMakerClient: characters encoded by
    `encode_characters`, frames by `storymaker`; with `previews` a folder, frames stream over gRPC and every preview
    is saved there."""

    def __init__(self, client: StoryMakerClient, previews: Path | None = None, preview_every: int | None = None,
                 progress=print):
        self.client, self.previews, self.preview_every, self.progress = client, previews, preview_every, progress
        if previews is not None:
            previews.mkdir(parents=True, exist_ok=True)

    def encode_characters(self, characters: list[dict], identity_only: bool, interpolation: float | None):
        return self.client.encode_characters(characters, identity_only, interpolation)

    def generate(self, opts: GenerateOptions, tokens, frame: int, frames: int, given: frozenset = frozenset()):
        """Frame number `frame` of `frames` as a runtime.story.FrameResult. Only the options the story or the
        command line set are sent: the deployment applies its own defaults (its profile's size, a few-step LoRA's
        scheduler) to the others."""
        from storymaker_serve.runtime.story import FrameResult  # the story side loads torch: only when used

        sampling = {k: getattr(opts, k) for k in OPTIONS if k in given}
        pose = opts.pose_image                    # a uint8 array: sent as lossless PNG (_bytes), the array exactly
        if self.previews is None:
            img, info = self.client.generate(opts.prompt, tokens=tokens, pose=pose,
                                             negative_prompt=opts.negative_prompt, **sampling)
            return FrameResult(img, info["png"], info["truncated"])
        for ev in self.client.generate_stream(opts.prompt, tokens=tokens, pose=pose, preview_every=self.preview_every,
                                              negative_prompt=opts.negative_prompt, **sampling):
            if not ev["final"]:
                pv = self.previews / f"frame_{frame:02d}_step_{ev['steps_done']:03d}.png"
                Image.fromarray(ev["image"]).save(pv)
                self.progress(f"frame {frame}/{frames}: step {ev['steps_done']} preview {pv}")
        return FrameResult(ev["image"], ev["png"], ev["truncated"])


def main(argv=None) -> int:
    # the story runner and its checks load torch and the preprocessing; the client API above does not
    from storymaker_serve.runtime.story import Story, check_story, run_story

    ap = argument_parser("python -m runtime.client", __doc__)
    ap.add_argument("story", type=Path, help="story YAML (see runtime/story.py)")
    ap.add_argument("--url", help="server address (default: 127.0.0.1:8001 for gRPC, 127.0.0.1:8000 for HTTP)")
    ap.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="Triton protocol")
    tls = ap.add_argument_group("TLS")
    tls.add_argument("--ssl", action="store_true", help="connect with TLS")
    tls.add_argument("--root-certificates", metavar="PEM", help="CA bundle to verify the server (default: system)")
    tls.add_argument("--private-key", metavar="PEM", help="client key (mutual TLS)")
    tls.add_argument("--certificate-chain", metavar="PEM", help="client certificate chain (mutual TLS)")
    tls.add_argument("--insecure", action="store_true",
                     help="HTTP: do not verify the server certificate (testing only)")
    ap.add_argument("--serve", type=Path, metavar="REPO", help="start a local tritonserver on REPO for this run")
    ap.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                    help="seconds to wait for the server and its models to be ready before giving up")
    ap.add_argument("--out", type=Path, default=Path("out/story"), help="output folder")
    ap.add_argument("--concurrency", type=int, default=1, help="frames generated at once")
    ap.add_argument("--previews", type=Path, metavar="DIR", help="stream each frame (gRPC) and save its previews here")
    ap.add_argument("--preview-every", type=int, default=5, help="with --previews: a preview every k steps")
    add_sampling_args(ap)
    a = ap.parse_args(argv)
    configure_logging(a)
    overrides = sampling_overrides(a)
    server = None
    try:
        story = Story.load(a.story)
        if a.serve:
            from storymaker_serve.runtime.serving.launcher import TritonServer

            print(f"starting tritonserver on {a.serve} (loopback) ...", flush=True)
            server = TritonServer(a.serve).start()
            a.url = server.url if a.protocol == "grpc" else f"{server.address}:{server.http_port}"
            print(f"server ready at {a.url}", flush=True)
        url = a.url or ("127.0.0.1:8001" if a.protocol == "grpc" else "127.0.0.1:8000")
        client = StoryMakerClient(url, protocol=a.protocol, ssl=a.ssl, root_certificates=a.root_certificates,
                                  private_key=a.private_key, certificate_chain=a.certificate_chain, insecure=a.insecure,
                                  tune_malloc=True)
        if a.previews and a.protocol != "grpc":
            raise InputError("--previews streams over gRPC; drop --protocol http")
        progress = lambda s: print(s, flush=True)
        check_story(story, overrides)                   # the story's own mistakes first, before any connection
        client.wait_ready(a.connect_timeout, progress)
        remote = RemoteStoryMaker(client, a.previews, a.preview_every, progress)
        paths = run_story(remote, story, a.out, overrides, a.concurrency, progress)
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
