"""What several test modules share: the test photos, the demo story's characters, diffusers' SDXL scheduler
config, small UNet inputs and the host-read probe. Test modules import from here, never from each other."""

import contextlib
import shutil

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from storymaker_serve.benchmarks.processes import tree_rss_kib
from storymaker_serve.examples import DATA, STORY  # noqa: F401 - shared with the test modules
from storymaker_serve.runtime.adapter import attach_storymaker
from storymaker_serve.runtime.loaders import load_mask_bin, load_sdxl

MAN = {"photo": DATA / "ldh.png", "mask": DATA / "ldh_mask.png", "face": DATA / "ldh.face.json"}
WOMAN = {"photo": DATA / "tsy.png", "mask": DATA / "tsy_mask.png"}          # face detected by buffalo_l
THIRD = {"photo": DATA / "two_people.jpg", "mask": DATA / "two_people_mask.png", "mask_channel": 2}
CLOTH, POSE = DATA / "cloth1.png", DATA / "two_people_pose.jpg"

SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                  "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear"}


def unet_with(bundle, fuse, lora_scale=0.8):
    """The demo bundle's UNet with StoryMaker's processors attached (LoRA fused or not), and the adapter's weights."""
    _, ip = load_mask_bin(bundle / "mask.bin")
    unet = load_sdxl(bundle / "sdxl").unet.eval()
    return attach_storymaker(unet, ip, lora_scale=lora_scale, ip_scale=0.8, fuse=fuse), ip


def unet_inputs(unet, t_img=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return dict(sample=torch.randn(2, 4, 24, 32, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 77 + t_img, d, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[192., 256, 0, 0, 192, 256]] * 2)})


class HostSyncs(TorchDispatchMode):
    """Records every op that makes the host wait for a tensor's value (.item(), bool(t), nonzero, .cpu())."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        to_host = name.startswith("aten._to_copy") and str(kwargs.get("device", "")) == "cpu" and \
            args[0].device.type != "cpu"
        if to_host or any(s in name for s in ("_local_scalar_dense", "nonzero", "aten.equal")):
            self.ops.append(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def exact_fp32():
    """Full float32 on a GPU while it lasts: TF32 off for cuBLAS matmuls and for cuDNN convolutions (both default to
    TF32 on Ampere and later), restored afterwards. A no-op for results on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def copy_build(built, tmp_path):
    """A private copy of the session's demo build (the bundle stays where the manifest's keys expect it)."""
    dst = tmp_path / "build"
    shutil.copytree(built, dst, symlinks=True, ignore=shutil.ignore_patterns("demo_bundle", "triton_repo*"))
    return dst


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all below it (a server's reaper, tritonserver and its Python-backend stubs), in MB."""
    return tree_rss_kib(pid) / 1024
