"""Few-step distillation LoRAs: recognised in kohya and diffusers key layouts by their published names, fused like
any LoRA, and their recommended sampler, spacing, steps and guidance become the run's and the build's defaults
(a flag, a story or a request still wins). Synthetic LoRA files with the published names; nothing is downloaded."""
import json

import pytest
import torch
from helpers import DATA
from safetensors.torch import save_file

from storymaker_serve.export.build import main as build_main
from storymaker_serve.runtime.errors import WeightsError
from storymaker_serve.runtime.few_step import recommended, sampling_defaults
from storymaker_serve.runtime.generate import main as generate_main
from storymaker_serve.runtime.manifest import Manifest

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"


def _kohya(path, bundle, name_in_metadata=None):
    """A kohya-format LoRA on one projection of the demo UNet (lora_down/lora_up/alpha keys)."""
    from storymaker_serve.runtime.loaders import load_sdxl

    w = load_sdxl(bundle / "sdxl").unet.get_submodule(ATTN).to_q.weight
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_" + ATTN.replace(".", "_") + "_to_q"
    tensors = {f"{key}.lora_down.weight": torch.randn(4, w.shape[1], generator=g),
               f"{key}.lora_up.weight": torch.randn(w.shape[0], 4, generator=g) * 0.01,
               f"{key}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(path), metadata={"ss_output_name": name_in_metadata} if name_in_metadata else None)
    return path


def _diffusers(folder, bundle):
    """A diffusers-format LoRA (peft keys, pytorch_lora_weights.safetensors in a folder named after its repo)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from storymaker_serve.runtime.loaders import load_sdxl

    unet = load_sdxl(bundle / "sdxl").unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights="gaussian"))
    folder.mkdir(parents=True)
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                                safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_published_names_are_recognised(bundle, tmp_path):
    lightning = _kohya(tmp_path / "sdxl_lightning_4step_lora.safetensors", bundle)
    assert recommended(lightning) == {"scheduler": "euler", "timestep_spacing": "trailing", "guidance": 0.0,
                                      "steps": 4}
    renamed = _kohya(tmp_path / "my_file.safetensors", bundle, name_in_metadata="Hyper-SDXL-8steps-lora")
    assert recommended(renamed)["scheduler"] == "ddim" and recommended(renamed)["steps"] == 8
    lcm = _diffusers(tmp_path / "lcm-lora-sdxl", bundle)
    assert recommended(lcm) == {"scheduler": "lcm", "guidance": 1.0, "steps": 4}
    style = _kohya(tmp_path / "watercolor.safetensors", bundle)
    assert recommended(style) == {} and sampling_defaults([(style, 0.7)]) == {}
    with pytest.raises(WeightsError, match="2 few-step LoRAs"):
        sampling_defaults([(lightning, 1.0), (lcm, 1.0)])


def test_a_few_step_lora_sets_the_run_defaults(bundle, tmp_path, capsys):
    """runtime.generate with SDXL-Lightning 4-step: Euler, trailing, 4 steps, no CFG batch: 4 UNet rows per frame
    instead of 50; a flag still wins over the LoRA's recommendation."""
    lora = _kohya(tmp_path / "sdxl_lightning_4step_lora.safetensors", bundle)
    story = tmp_path / "story.yaml"                      # no sampling settings of its own: the LoRA's apply
    story.write_text(f"characters:\n  - {{name: man, photo: {DATA}/ldh.png, mask: {DATA}/ldh_mask.png, "
                     f"face: {DATA}/ldh.face.json}}\nframes:\n  - a man in a park\n  - a man in a cafe\n")
    base = ["--weights", str(bundle), "--story", str(story), "--width", "64", "--height", "64", "--lora", f"{lora}:1.0"]
    assert generate_main([*base, "--out", str(tmp_path / "a")]) == 0
    frames = json.loads((tmp_path / "a" / "settings.json").read_text())["frames"]
    assert {(f["scheduler"], f["timestep_spacing"], f["steps"], f["guidance"], f["unet_rows"]) for f in frames} == \
        {("euler", "trailing", 4, 0.0, 4)}
    assert "few-step LoRA: sampling defaults" in capsys.readouterr().out
    assert generate_main([*base, "--out", str(tmp_path / "b"), "--scheduler", "lcm", "--guidance", "2"]) == 0
    frames = json.loads((tmp_path / "b" / "settings.json").read_text())["frames"]
    assert {(f["scheduler"], f["steps"], f["unet_rows"]) for f in frames} == {("lcm", 4, 8)}


@pytest.mark.slow
def test_a_build_records_the_few_step_defaults(built, bundle, tmp_path, capsys):
    lora = _kohya(tmp_path / "dmd2_sdxl_4step_lora.safetensors", bundle)
    out = tmp_path / "b"
    assert build_main(["--weights", str(built / "demo_bundle"), "--out", str(out), "--components", "ppr",
                       "--lora", str(lora), "--default-guidance", "1.0"]) == 0
    assert Manifest(out).sampling_defaults == {"scheduler": "lcm", "guidance": 1.0, "steps": 4}
    assert "sampling defaults served" in capsys.readouterr().out
