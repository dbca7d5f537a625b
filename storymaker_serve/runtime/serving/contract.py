"""The I/O of the BLS models (`text_encoder`, `encode_characters`, `sampler`, `storymaker`), declared once.

The engine models' I/O comes from their component specs in the manifest; the BLS models' I/O is declared
here, and everything else derives from it: their `config.pbtxt` (export/triton_repo.py), the defaults the glue
applies to missing optional inputs (runtime/serving/glue.py: a sampling input's default is the
`GenerateOptions` field it sets, so the server and in-process runs share one set of defaults), the tensor
types the client sends (runtime/serving/client.py) and the table in docs/serving.md (`markdown_table`, checked by a
test). Dims are ints, -1 (any), or the build's symbols: "D" image-token/text width, "P" pooled width,
"L" text length, "C" latent channels.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

NUMPY = {"BYTES": object, "FP32": "float32", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


@dataclass(frozen=True)
class Port:
    name: str
    dtype: str                       # Triton data type: BYTES FP32 INT32 INT64 BOOL UINT8
    dims: tuple
    optional: bool = False
    option: str | None = None        # the GenerateOptions field this input sets (its default applies)
    doc: str = ""

    @property
    def default(self):
        if self.option is None:
            return None
        # imported here: the launcher and the gateway read this declaration and must not load torch
        from storymaker_serve.runtime.pipeline import GenerateOptions

        return next(f.default for f in fields(GenerateOptions) if f.name == self.option)

    def resolve(self, sizes: dict[str, int]) -> list[int]:
        return [sizes[d] if isinstance(d, str) else d for d in self.dims]


@dataclass(frozen=True)
class BLSModel:
    name: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    instances: int
    doc: str
    decoupled: bool = False          # Triton decoupled mode: any number of responses per request (gRPC stream)
    inflight: bool = False           # runs denoising loops: many requests per instance, steps batched (batcher.py)

    def port(self, name: str) -> Port:
        for p in self.inputs + self.outputs:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no input or output {name!r}")


# Request budgets (config parameters of every BLS model; these defaults are written into config.pbtxt and can
# be edited there): checked from the sizes of the inputs before anything is decoded or forwarded by BLS.
LIMITS = {
    "max_prompt_bytes": 4096,            # PROMPT / NEGATIVE_PROMPT: ~50x what 77 tokens need, far below megabytes
    "max_element_bytes": 32 << 20,       # one encoded image (PHOTOS, MASKS, CLOTHS, POSE elements)
    "max_request_bytes": 64 << 20,       # all images of one request together
}
# Models that run denoising loops (BLSModel.inflight): requests in flight per instance (each on its own thread, their
# steps batched into shared UNet executions) and how long a round waits for a loop that is not yet at its call.
# The frame models also get `denoise_engines` from the build's deployment (export/triton_repo.py): "bls" calls the
# unet/controlnet/vae_decoder models (one UNet execution per step for all loops in flight; the engines stay their own
# models, native TensorRT in the NGC repository) or "inprocess": the model runs their sessions itself, so
# embeddings, latents and residuals never leave its process (no BLS per step; each such model holds its own copy).
INFLIGHT = {"max_inflight": 16, "step_batch_wait_ms": 10}
IMAGE_INPUTS = ("PHOTOS", "MASKS", "CLOTHS", "FACE_INFO", "POSE")


def _opt(ports):
    return tuple(Port(p.name, p.dtype, p.dims, True, p.option, p.doc) for p in ports)


CHARACTERS = (
    Port("PHOTOS", "BYTES", (-1,), doc="encoded photo per character (PNG/JPEG/WEBP)"),
    Port("MASKS", "BYTES", (-1,), doc="encoded mask per character (white = character)"),
    Port("CLOTHS", "BYTES", (-1,), True, doc="clothing image per character, empty element = none"),
    Port("FACE_INFO", "BYTES", (-1,), True, doc='face JSON {"kps", "embedding"} per character, empty = detect'),
    Port("MASK_CHANNELS", "INT32", (-1,), True, doc="channel of a colour-coded mask per character"),
    Port("IDENTITY_ONLY", "BOOL", (1,), True, doc="zero the character-image tokens"),
    Port("INTERPOLATION", "FP32", (1,), True, doc="blend characters 1 and 2 with this weight"),
)
TOKENS = (Port("IMAGE_TOKENS", "FP32", (1, -1, "D"), doc="[1, 20(n+1), D] from encode_characters"),
          Port("NEG_IMAGE_TOKENS", "FP32", (1, -1, "D"), doc="the CFG negative of IMAGE_TOKENS"))
TEXT = (Port("PROMPT_EMBEDS", "FP32", (2, "L", "D"), doc="[negative, positive] text tokens"),
        Port("POOLED", "FP32", (2, "P"), doc="[negative, positive] pooled text embedding"))
SAMPLING = (
    Port("SEED", "INT64", (1,), True, "seed", "noise seed (0 .. 2^32-1, as the CPU generator draws it)"),
    Port("STEPS", "INT32", (1,), True, "steps", "sampling steps (UNet evaluations: steps, x2 with CFG)"),
    Port("GUIDANCE", "FP32", (1,), True, "guidance", "classifier-free guidance scale"),
    Port("WIDTH", "INT32", (1,), True, "width", "image width in pixels"),
    Port("HEIGHT", "INT32", (1,), True, "height", "image height in pixels"),
    Port("IP_SCALE", "FP32", (1,), True, "ip_scale", "character-image attention scale"),
    Port("POSE", "BYTES", (1,), True, doc="encoded OpenPose map (needs the controlnet model)"),
    Port("CONTROLNET_SCALE", "FP32", (1,), True, "controlnet_scale", "ControlNet residual scale"),
    Port("SCHEDULER", "BYTES", (1,), True, "scheduler", "sampler: unipc, dpmpp-2m, dpmpp-2m-karras, euler, "
         "euler-a, ddim, lcm or tcd"),
    Port("TIMESTEP_SPACING", "BYTES", (1,), True, "timestep_spacing", "leading, trailing or linspace (default: "
         "the scheduler config's)"),
    Port("NOISE_DEVICE", "BYTES", (1,), True, "noise_device", "cpu (default: the same images on every host) or "
         "cuda (the release's images; the loop must run on a GPU)"),
)
PROMPTS = (Port("PROMPT", "BYTES", (1,), doc="UTF-8 prompt"),
           Port("NEGATIVE_PROMPT", "BYTES", (1,), True, doc="UTF-8 negative prompt (none: zero embeddings)"))
TRUNCATED = Port("TRUNCATED", "BOOL", (1,), doc="the prompt exceeded L tokens and was cut, as SDXL does")

ENCODE_PNG = Port("ENCODE_PNG", "BOOL", (1,), True, doc="false: leave PNG empty and return the raw IMAGE only "
                                                        "(saves the encode on the request's path; default true)")
FRAME = (Port("IMAGE", "UINT8", (-1, -1, 3), doc="the frame"), Port("PNG", "BYTES", (1,), doc="the frame as PNG"),
         TRUNCATED)

MODELS = {m.name: m for m in (
    BLSModel("text_encoder", PROMPTS, (*TEXT, TRUNCATED), 1,
             "both tokenizers, then the `text_encoder_1` and `text_encoder_2` models "
             "(prompt and negative as one batch)"),
    BLSModel("encode_characters", CHARACTERS, TOKENS, 1,
             "crop by mask, face detection/alignment (the build's buffalo_l files), CLIP, resampler"),
    BLSModel("sampler", (*TEXT, *TOKENS, *SAMPLING),
             (Port("LATENTS", "FP32", (1, "C", -1, -1), doc="denoised latents"),),
             1, "the sampling loop (SCHEDULER; CFG above guidance 1), unet/controlnet each step", inflight=True),
    BLSModel("storymaker", (*PROMPTS, *_opt(TOKENS), *_opt(CHARACTERS), *SAMPLING, ENCODE_PNG), FRAME, 1,
             "a frame: text (tokenizers here, the text encoder engines), tokens (given, or computed from PHOTOS...), "
             "loop, VAE", inflight=True),
    BLSModel("storymaker_stream", (*PROMPTS, *_opt(TOKENS), *_opt(CHARACTERS), *SAMPLING, ENCODE_PNG,
                                   Port("PREVIEW_EVERY", "INT32", (1,), True, doc="a preview every k steps (0: none; "
                                                                                 "default 5)")),
             (*FRAME, Port("STEPS_DONE", "INT32", (1,), doc="steps run when this response was sent"),
              Port("FINAL", "BOOL", (1,), doc="true on the frame, false on a preview")), 1,
             "storymaker over a gRPC stream: low-resolution previews (IMAGE, one pixel per latent) every "
             "PREVIEW_EVERY steps, then the frame (FINAL); cancelling the stream stops the loop", decoupled=True,
             inflight=True),
)}


def markdown_table() -> str:
    """The docs/serving.md rows of the BLS models: model | does | inputs (optional ones with ?) -> outputs."""
    rows = []
    for m in MODELS.values():
        ins = ", ".join(p.name + ("?" if p.optional else "") + (f"={p.default}" if p.default is not None else "")
                        for p in m.inputs)
        rows.append(f"| `{m.name}` (BLS) | {m.doc} | {ins} -> {', '.join(p.name for p in m.outputs)} |")
    return "\n".join(rows)
