"""`python -m export.build --demo`: every component exported, checked against PyTorch, recorded, cached."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from storymaker_serve.export.build import main

COMPONENTS = {"face_detector", "face_recognizer", "clip_vision", "ppr", "text_encoder", "text_encoder_2", "unet",
              "controlnet", "vae_decoder"}


def test_manifest_records_every_component(built, capsys):
    m = json.loads((built / "manifest.json").read_text())
    assert set(m["components"]) == COMPONENTS
    for name, c in m["components"].items():
        assert c["parity"]["passed"] is True and c["precision"] == "fp32", name
        assert c["parity"]["max_abs_err"] <= c["spec"]["tolerance"], name
        for f in c["files"]:
            assert (built / f["path"]).exists() and len(f["sha256"]) == 64
        assert c["profile"] and c["inputs"] and c["outputs"] and "export_seconds" in c
    assert m["components"]["unet"]["opset"] == 17 and m["tools"]["onnxruntime"]
    from storymaker_serve.export.tensorrt import availability

    if availability()[0]:           # per device: with TensorRT and a GPU every component gets an engine
        assert sorted(m["engines"]["built"]) == sorted(COMPONENTS) and m["engines"]["tensorrt"]
    else:
        assert sorted(m["engines"]["skipped"]) == sorted(COMPONENTS) and m["engines"]["tensorrt"] is None
        assert all(c["engine"]["status"] == "skipped" and c["engine"]["reason"] for c in m["components"].values())
    assert {s["n"] for s in m["components"]["ppr"]["parity"]["shapes"]} == {1, 2, 3}
    assert {s["S"] for s in m["components"]["unet"]["parity"]["shapes"]} == {117, 137, 157}
    roles = ("sdxl/", "mask.bin", "image_encoder/", "controlnet/", "buffalo_l/")
    assert m["weights"] and all(k.startswith(roles) for k in m["weights"])        # keyed by role, not location
    assert m["weights_layout"]["sdxl"] == str(built / "demo_bundle" / "sdxl")      # where they came from


def test_second_build_reuses_cache(built, capsys):
    before = json.loads((built / "manifest.json").read_text())["components"]
    capsys.readouterr()
    assert main(["--demo", "--out", str(built)]) == 0
    out = capsys.readouterr().out
    assert out.count("cached") == len(COMPONENTS) and "building" not in out
    after = json.loads((built / "manifest.json").read_text())["components"]
    assert {k: v["files"] for k, v in before.items()} == {k: v["files"] for k, v in after.items()}


def _unet_feeds(built, ip_scale):
    spec = json.loads((built / "manifest.json").read_text())["components"]["unet"]["spec"]
    from storymaker_serve.runtime.spec import ComponentSpec, TensorSpec

    s = ComponentSpec(spec["name"], tuple(TensorSpec(**{**t, "dims": tuple(t["dims"])}) for t in spec["inputs"]),
                      tuple(TensorSpec(**{**t, "dims": tuple(t["dims"])}) for t in spec["outputs"]),
                      {k: tuple(v) for k, v in spec["symbols"].items()})
    feeds = s.sample_inputs(s.assignment("opt"), seed=5)
    feeds["ip_scale"] = np.full_like(feeds["ip_scale"], ip_scale)
    for k in feeds:                        # no pose map: ControlNet residuals are zeros
        if k.endswith("_res") or k.startswith("down_res"):
            feeds[k] = np.zeros_like(feeds[k])
    return feeds


def test_ip_scale_is_a_runtime_input_of_the_onnx_unet(built, bundle):
    """Changing ip_scale at run time changes the ONNX output exactly as it changes the reference's."""
    from storymaker_serve.runtime.adapter import attach_storymaker
    from storymaker_serve.runtime.loaders import load_mask_bin, load_sdxl

    sess = ort.InferenceSession(str(built / "onnx/unet/model.onnx"), providers=["CPUExecutionProvider"])
    ref = load_sdxl(bundle / "sdxl").unet.eval()
    # the release's processors
    attach_storymaker(ref, load_mask_bin(bundle / "mask.bin")[1], lora_scale=0.8, fuse=False)
    outs = {}
    for s in (0.0, 0.8):
        f = _unet_feeds(built, s)
        onnx_out = sess.run(["noise_pred"], f)[0]
        with torch.no_grad():
            t = {k: torch.from_numpy(v) for k, v in f.items()}
            ref_out = ref(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                          added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
                          cross_attention_kwargs={"ip_scale": t["ip_scale"]}).sample.numpy()
        assert np.abs(onnx_out - ref_out).max() <= 1e-4
        outs[s] = onnx_out
    assert np.abs(outs[0.8] - outs[0.0]).max() > 1e-3


@pytest.mark.slow
def test_fp16_build_subset(tmp_path, bundle):
    out = tmp_path / "b16"
    assert main(["--weights", str(bundle), "--fp16", "--out", str(out), "--components", "ppr,unet,vae_decoder"]) == 0
    c = json.loads((out / "manifest.json").read_text())["components"]
    assert c["unet"]["precision"] == "fp16" and c["unet"]["parity"]["cos_sim"] >= 0.999
    assert c["unet"]["files"][0]["path"].endswith("model.fp16.onnx") and c["unet"]["parity_fp32_export"]["passed"]
    assert c["vae_decoder"]["precision"] == "fp32"   # SDXL's VAE stays fp32 unless --fp16-vae
    # CPU-only sessions serve the fp32 export (recorded and hashed beside the fp16 files), GPU ones the fp16 files
    from storymaker_serve.runtime.manifest import Manifest
    from storymaker_serve.runtime.serving.engines import Build

    unet = Manifest(out).component("unet")
    assert [f.path for f in unet.files_for(["cpu"])] == [f["path"] for f in c["unet"]["fp32_files"]]
    assert unet.files_for(["cpu"])[0].path.endswith("unet/model.onnx")
    assert unet.files_for(["cuda", "cpu"])[0].path.endswith("model.fp16.onnx")
    assert Manifest(out).component("vae_decoder").files_for(["cpu"]) == Manifest(out).component("vae_decoder").files
    sess = Build(out).engine("unet").sess
    assert sess._model_path.endswith("unet/model.onnx") if hasattr(sess, "_model_path") else True


@pytest.mark.parametrize("args,msg", [
    (["--weights", "/nonexistent/weights"], "does not exist"),
    (["--demo", "--opset", "12"], "opset 12 is not supported"),
    (["--demo", "--max-characters", "4"], "4 characters requested.*1 to 3"),
    (["--demo", "--components", "unet,imaginary"], "cannot build \\['imaginary'\\]"),
])
def test_bad_build_inputs(tmp_path, capsys, args, msg):
    import re

    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    assert re.search(msg, capsys.readouterr().err)


@pytest.mark.slow
def test_style_lora_is_fused_before_export(tmp_path, bundle, built):
    """--lora FILE:SCALE changes the exported UNet (new cache key) and parity still holds against a
    reference that has the same style LoRA fused."""
    from safetensors.torch import save_file

    attn = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
    g = torch.Generator().manual_seed(0)
    save_file({f"{attn}.lora_down.weight": torch.randn(4, 64, generator=g),
               f"{attn}.lora_up.weight": torch.randn(64, 4, generator=g) * 0.1, f"{attn}.alpha": torch.tensor(4.0)},
              tmp_path / "style.safetensors")
    out = tmp_path / "styled"
    assert main(["--weights", str(built / "demo_bundle"), "--out", str(out), "--components", "unet",
                 "--lora", f"{tmp_path / 'style.safetensors'}:0.7"]) == 0
    styled = json.loads((out / "manifest.json").read_text())
    plain = json.loads((built / "manifest.json").read_text())["components"]["unet"]
    assert styled["components"]["unet"]["parity"]["passed"]
    assert styled["style_loras"] == [f"{tmp_path / 'style.safetensors'}:0.7"]
    assert styled["components"]["unet"]["files"][0]["sha256"] != plain["files"][0]["sha256"]


def test_triton_repositories_are_complete_and_parse(built):
    """Every generated config.pbtxt parses as Triton's ModelConfig; the NGC variant uses native backends
    for the engine models and links the build's files."""
    from storymaker_serve.export.triton_config import parse_pbtxt
    from storymaker_serve.runtime.serving.launcher import REQUIRED_MODELS, check_repo

    check_repo(built / "triton_repo")
    for repo in ("triton_repo", "triton_repo_ngc"):
        for cfg_file in (built / repo).glob("*/config.pbtxt"):
            cfg = parse_pbtxt(cfg_file.read_text())
            assert cfg.name == cfg_file.parent.name
    ngc = built / "triton_repo_ngc"
    for name in ("clip_vision", "ppr", "text_encoder_1", "text_encoder_2", "unet", "controlnet", "vae_decoder"):
        cfg = parse_pbtxt((ngc / name / "config.pbtxt").read_text())
        assert cfg.backend == "onnxruntime" and (ngc / name / "1" / "model.onnx").resolve().exists()
    unet = parse_pbtxt((ngc / "unet" / "config.pbtxt").read_text())
    assert unet.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert set(REQUIRED_MODELS) <= {p.name for p in ngc.iterdir()}


def _hf_cache(src, dst):
    """A Hugging Face hub cache entry for folder `src`: blobs by sha256, snapshots/REV of relative symlinks,
    refs/main."""
    import hashlib
    import os

    rev = "0123abcd"
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        (dst / "blobs").mkdir(parents=True, exist_ok=True)
        (dst / "blobs" / sha).write_bytes(f.read_bytes())
        link = dst / "snapshots" / rev / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(dst / "blobs" / sha, link.parent))
    (dst / "refs").mkdir()
    (dst / "refs" / "main").write_text(rev)
    return dst


def test_weights_as_flags_symlinks_or_hf_cache_give_the_same_build(tmp_path, built, capsys):
    """The same weights given as one folder, as components one by one (SDXL from a Hugging Face cache entry),
    and as a folder of symlinks export to the same files (sha256) and the same stage keys, so a rebuild from
    another layout is served from the cache."""
    bundle = built / "demo_bundle"
    hf = _hf_cache(bundle / "sdxl", tmp_path / "hub" / "models--demo--sdxl")
    links = tmp_path / "links"
    links.mkdir()
    for p in bundle.iterdir():
        (links / p.name).symlink_to(p.resolve())
    comps = ["--components", "ppr,text_encoder_2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--sdxl", str(hf), "--mask-bin", str(bundle / "mask.bin"), "--image-encoder",
                 str(bundle / "image_encoder"), "--buffalo-l", str(bundle / "buffalo_l"), "--out", str(a), *comps]) == 0
    assert main(["--weights", str(links), "--out", str(b), *comps]) == 0
    ma, mb = (json.loads((d / "manifest.json").read_text())["components"] for d in (a, b))
    for name in ("ppr", "text_encoder_2"):
        assert ma[name]["files"][0]["sha256"] == mb[name]["files"][0]["sha256"] and ma[name]["key"] == mb[name]["key"]
    capsys.readouterr()
    assert main(["--weights", str(links), "--out", str(a), *comps]) == 0     # the flag-built folder, another layout
    assert capsys.readouterr().out.count(": cached") == 2
    from storymaker_serve.runtime.errors import WeightsError
    from storymaker_serve.runtime.weights import WeightsLayout, hf_cache_path

    assert hf_cache_path(hf) == hf / "snapshots" / "0123abcd"
    with pytest.raises(WeightsError, match="--image-encoder missing"):
        WeightsLayout.resolve(sdxl=hf, mask_bin=bundle / "mask.bin")
    assert main(["--sdxl", str(hf), "--out", str(tmp_path / "c")]) == 2


def test_interrupted_build_resumes_from_what_finished(tmp_path, built, monkeypatch, capsys):
    """The manifest is written after every component: a build that dies part-way keeps what finished, and the
    rerun reports those components cached and builds only the rest."""
    import storymaker_serve.export.build as eb

    real, done = eb._build_one, []

    def dies_on_the_third(name, *a, **k):
        if len(done) == 2:
            raise KeyboardInterrupt("power cut")
        done.append(name)
        return real(name, *a, **k)

    out, comps = tmp_path / "b", ["--components", "ppr,text_encoder,text_encoder_2,vae_decoder"]
    args = ["--weights", str(built / "demo_bundle"), "--out", str(out), *comps]
    monkeypatch.setattr(eb, "_build_one", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    kept = json.loads((out / "manifest.json").read_text())["components"]
    assert sorted(kept) == sorted(done) == ["ppr", "text_encoder"]
    monkeypatch.setattr(eb, "_build_one", real)
    capsys.readouterr()
    assert main(args) == 0
    lines = capsys.readouterr().out
    assert "ppr: cached" in lines and "text_encoder: cached" in lines
    assert "text_encoder_2: building" in lines and "vae_decoder: building" in lines


def test_parity_modes(tmp_path, built, capsys):
    """--parity quick checks the minimum shapes only, off checks none and says so (never 'passed'); auto is full on
    the demo bundle. Each result states its scale-aware tolerance and the relative error."""
    args = ["--weights", str(built / "demo_bundle"), "--components", "ppr,vae_decoder"]
    assert main([*args, "--out", str(tmp_path / "q"), "--parity", "quick"]) == 0
    c = json.loads((tmp_path / "q" / "manifest.json").read_text())["components"]
    assert all(len(r["parity"]["shapes"]) == 1 and r["parity"]["passed"] and r["parity_mode"] == "quick"
               for r in c.values())
    assert c["ppr"]["parity"]["shapes"] == [{"n": 1}] and c["vae_decoder"]["parity"]["rel_err"] is not None
    assert "x max(1, max|ref|)" in c["vae_decoder"]["parity"]["tolerance"]
    assert main([*args, "--out", str(tmp_path / "o"), "--parity", "off"]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert all(r["parity"]["status"] == "not run: --parity off" and not r["parity"]["passed"]
               for r in m["components"].values())
    full = json.loads((built / "manifest.json").read_text())
    ppr = full["components"]["ppr"]
    assert len(ppr["parity"]["shapes"]) == 3 and ppr["parity_mode"] == "full"
    assert 0 < full["peak_rss_gib"] < 20 and all(r["peak_rss_gib"] > 0 for r in full["components"].values())


@pytest.mark.slow
def test_build_loads_one_component_at_a_time(tmp_path, built, monkeypatch):
    """The memory-conscious build never loads the whole SDXL pipeline (a full-size fp32 UNet is 11.6 GB; the old
    build held a fused and an unfused one): each component loads its own part, and the UNet is exported from the
    same model whose unfused processors gave the reference outputs."""
    import storymaker_serve.export.stage as stage
    import storymaker_serve.runtime.loaders as L

    for module in (L, stage):                    # wherever the build could call them from
        monkeypatch.setattr(module, "load_sdxl", lambda *a, **k: pytest.fail("whole SDXL pipeline loaded"),
                            raising=False)
        monkeypatch.setattr(module, "load_storymaker", lambda *a, **k: pytest.fail("all models loaded at once"),
                            raising=False)
    loaded = []
    real = L.load_sdxl_part
    monkeypatch.setattr(stage, "load_sdxl_part", lambda path, part, *a: loaded.append(part) or real(path, part, *a))
    assert main(["--weights", str(built / "demo_bundle"), "--out", str(tmp_path / "b"),
                 "--components", "text_encoder,unet,vae_decoder"]) == 0
    assert loaded == ["text_encoder", "unet", "vae"]
    c = json.loads((tmp_path / "b" / "manifest.json").read_text())["components"]
    assert c["unet"]["parity"]["passed"] and c["unet"]["parity"]["max_abs_err"] <= 1e-4   # fused export vs unfused ref


def test_clip_graph_leaves_the_reference_encoder_whole(layout):
    """ClipVisionGraph drops the last layer from its own copy only: the parity reference (hidden_states[-2] of
    the whole encoder) must still see every layer."""
    import torch

    from storymaker_serve.export.components import ClipVisionGraph, ClipVisionReference
    from storymaker_serve.runtime.loaders import load_image_encoder

    enc = load_image_encoder(layout.image_encoder)
    n = len(enc.vision_model.encoder.layers)
    g = ClipVisionGraph(enc)
    assert len(enc.vision_model.encoder.layers) == n and len(g.vm.encoder.layers) == n - 1
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(g(x), ClipVisionReference(enc)(x))
