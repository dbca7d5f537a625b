"""The main job on the demo bundle: `python -m runtime.generate` over the demo story, and its errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import DATA, STORY
from PIL import Image

from storymaker_serve.runtime.generate import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_story_writes_frames_sheet_and_settings(bundle, tmp_path, capsys):
    rc = main(["--weights", str(bundle), "--story", str(STORY), "--out", str(tmp_path),
               "--steps", "3", "--width", "64", "--height", "48"])
    out = capsys.readouterr().out
    assert rc == 0, out
    frames = sorted(tmp_path.glob("frame_*.png"))
    assert len(frames) == 3 and all(Image.open(f).size == (64, 48) for f in frames)
    assert "frame 3/3" in out and str(tmp_path) in out
    assert Image.open(tmp_path / "contact_sheet.png").size[0] >= 3 * 64
    s = json.loads((tmp_path / "settings.json").read_text())
    assert [f["characters"] for f in s["frames"]] == [["man", "woman"]] * 3
    assert s["frames"][1]["cloth"] and s["frames"][2]["pose"] and s["frames"][2]["seed"] == 7
    assert s["frames"][0]["steps"] == 3 and s["frames"][0]["negative_prompt"] == "bad quality, blurry, lowres"
    a, b = (np.asarray(Image.open(f)) for f in frames[:2])
    assert not np.array_equal(a, b)


def test_single_frame_cli_and_clear_errors(bundle, tmp_path, capsys):
    data = DATA
    char = f"{data}/ldh.png,{data}/ldh_mask.png,{data}/ldh.face.json"
    assert main(["--weights", str(bundle), "--prompt", "a man", "--character", char, "--out", str(tmp_path),
                 "--steps", "2", "--width", "64", "--height", "64", "--identity-only"]) == 0
    assert (tmp_path / "frame_01.png").exists()
    rc = main(["--weights", str(tmp_path / "missing"), "--prompt", "a man", "--character", char])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["--weights", str(bundle), "--prompt", "a man", "--character", f"{data}/ldh.png,{data}/blank.png"])
    assert rc == 2 and "blank.png not found" in capsys.readouterr().err


def test_help_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "runtime.generate", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--story" in r.stdout and "--weights" in r.stdout


def test_torch_opt_backend_gives_the_reference_frames(bundle, tmp_path, capsys):
    """`--backend torch-opt` (fused projections, channels_last, offloaded encoders; the pose frame through its
    ControlNet path) writes
    the same three demo frames as the reference backend, to within 1 uint8 level per pixel."""
    story = ["--weights", str(bundle), "--story", str(STORY), "--steps", "3",
             "--width", "64", "--height", "48"]
    assert main([*story, "--out", str(tmp_path / "ref")]) == 0
    assert main([*story, "--out", str(tmp_path / "opt"), "--backend", "torch-opt", "--fused-qkv",
                 "--channels-last", "--offload-encoders"]) == 0
    assert "torch-opt backend" in capsys.readouterr().out
    for i in (1, 2, 3):
        a, b = (np.asarray(Image.open(tmp_path / d / f"frame_0{i}.png")).astype(int) for d in ("ref", "opt"))
        assert np.abs(a - b).max() <= 1, i


def test_torch_opt_flags_need_the_torch_opt_backend(bundle, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--weights", str(bundle), "--prompt", "a man", "--character", "a,b", "--fused-qkv"])
    assert "--fused-qkv needs --backend torch-opt" in capsys.readouterr().err


def test_every_scheduler_runs_from_the_command_line(bundle, tmp_path, capsys):
    import pytest

    from storymaker_serve.runtime.sampler_names import SCHEDULERS

    char = f"{DATA}/ldh.png,{DATA}/ldh_mask.png,{DATA}/ldh.face.json"
    one = ["--weights", str(bundle), "--prompt", "a man", "--character", char, "--steps", "2", "--width", "64",
           "--height", "48"]
    for name in SCHEDULERS:
        assert main([*one, "--scheduler", name, "--out", str(tmp_path / name)]) == 0, name
        frame = json.loads((tmp_path / name / "settings.json").read_text())["frames"][0]
        assert frame["scheduler"] == name and frame["unet_rows"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*one, "--scheduler", "bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'bogus'" in err and all(n in err for n in SCHEDULERS)
