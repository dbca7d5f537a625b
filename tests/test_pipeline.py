"""(e) Determinism per seed, the paper's applications reachable, and bad input giving clear errors."""
import numpy as np
import pytest
import torch
from helpers import DATA

from storymaker_serve.runtime.characters import Character
from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.pipeline import GenerateOptions, encode_text

SMALL = dict(width=64, height=48, steps=4)


@pytest.fixture(scope="module")
def tokens(pipe, two_characters):
    return pipe.encode_characters(two_characters)


def test_same_seed_same_image_different_seed_differs(pipe, tokens):
    a = pipe.generate(GenerateOptions("a man and a woman in a park", seed=3, **SMALL), tokens)
    b = pipe.generate(GenerateOptions("a man and a woman in a park", seed=3, **SMALL), tokens)
    c = pipe.generate(GenerateOptions("a man and a woman in a park", seed=4, **SMALL), tokens)
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5


def test_token_shapes_for_one_two_three_characters(pipe, two_characters):
    d = pipe.m.ppr.cfg.cross_attention_dim
    for chars in (two_characters[:1], two_characters, two_characters + two_characters[:1]):
        pos, neg = pipe.encode_characters(chars)
        assert pos.shape == neg.shape == (1, 20 * (len(chars) + 1), d)


def test_four_characters_rejected(pipe, two_characters):
    with pytest.raises(InputError, match="4 characters given; StoryMaker supports 1 to 3"):
        pipe.encode_characters(two_characters * 2)


def test_applications_change_the_tokens(pipe, two_characters):
    base, _ = pipe.encode_characters(two_characters)
    ident, _ = pipe.encode_characters(two_characters, identity_only=True)
    cloth = [Character.load(DATA / "ldh.png", DATA / "ldh_mask.png", DATA / "ldh.face.json", DATA / "cloth1.png")]
    clothed, _ = pipe.encode_characters(cloth)
    plain, _ = pipe.encode_characters(two_characters[:1])
    half, _ = pipe.encode_characters(two_characters, interpolation=0.5)
    zero, _ = pipe.encode_characters(two_characters, interpolation=0.0)
    assert not torch.allclose(base, ident)
    assert not torch.allclose(clothed, plain)
    assert half.shape == plain.shape and not torch.allclose(half, plain)
    assert torch.allclose(zero, plain, atol=1e-5)  # weight 0 is character 1 alone


def test_ip_scale_and_pose_change_the_image(pipe, tokens):
    from storymaker_serve.runtime.preprocess import decode_image

    a = pipe.generate(GenerateOptions("two people", ip_scale=0.8, **SMALL), tokens)
    b = pipe.generate(GenerateOptions("two people", ip_scale=0.0, **SMALL), tokens)
    pose = decode_image(DATA / "two_people_pose.jpg")
    c = pipe.generate(GenerateOptions("two people", pose_image=pose, controlnet_scale=1.0, **SMALL), tokens)
    assert np.abs(a.astype(int) - b).max() > 0
    assert np.abs(a.astype(int) - c).max() > 0


def test_negative_prompt_none_gives_zero_embeddings(models):
    t = encode_text(models.sdxl, "a cat", None)
    assert t.prompt_embeds.shape[0] == 2 and t.prompt_embeds[0].abs().sum() == 0 and t.pooled[0].abs().sum() == 0
    t2 = encode_text(models.sdxl, "a cat", "blurry")
    assert t2.prompt_embeds[0].abs().sum() > 0


def test_long_prompt_truncated_with_warning(models, caplog):
    long = " ".join(["cat"] * 120)
    t = encode_text(models.sdxl, long, None)
    assert t.prompt_embeds.shape[1] == 77
    assert "truncated" in caplog.text


@pytest.mark.parametrize("kw,msg", [
    (dict(prompt=""), "prompt is missing"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(width=60), "width=60 must be a positive multiple of 8"),
    (dict(height=-8), "height=-8"),
    (dict(guidance=float("nan")), "finite"),
])
def test_bad_options(pipe, tokens, kw, msg):
    opts = {"prompt": "x", **SMALL, **kw}
    with pytest.raises(InputError, match=msg):
        pipe.generate(GenerateOptions(**opts), tokens)


def test_missing_face_without_detector(pipe):
    c = Character.load(DATA / "ldh.png", DATA / "ldh_mask.png")
    analyzer, pipe.m.face_analyzer = pipe.m.face_analyzer, None
    try:
        with pytest.raises(InputError, match="no face info and no buffalo_l"):
            pipe.encode_characters([c])
    finally:
        pipe.m.face_analyzer = analyzer


def test_vae_scale_factor_comes_from_the_vae(layout, two_characters):
    """A VAE with three blocks (factor 4, not SDXL's 8): the starting latents, the engine specs and the image follow
    the VAE's config, so the frame still has the requested size."""
    from diffusers import AutoencoderKL

    from storymaker_serve.export.components import ExportProfile, build_specs
    from storymaker_serve.runtime.loaders import load_storymaker
    from storymaker_serve.runtime.pipeline import StoryMakerPipeline

    m = load_storymaker(layout)
    cfg = dict(m.sdxl.vae.config)
    cfg["block_out_channels"] = list(cfg["block_out_channels"])[:3]
    cfg["down_block_types"], cfg["up_block_types"] = cfg["down_block_types"][:3], cfg["up_block_types"][:3]
    m.sdxl.vae = AutoencoderKL.from_config(cfg).eval()
    pipe = StoryMakerPipeline(m)
    assert pipe.vae_factor == 4
    opts = GenerateOptions("two friends", seed=1, width=64, height=48, steps=2)
    tokens = pipe.encode_characters(two_characters)
    lat = pipe.latents(opts, encode_text(m.sdxl, opts.prompt, None), tokens)
    assert lat.shape == (1, 4, 12, 16)
    assert pipe.generate(opts, tokens).shape == (48, 64, 3)
    vae_spec = build_specs(m, ExportProfile.demo())["vae_decoder"]
    assert vae_spec.output("image").shape({"B": 1, "h": 12, "w": 16}) == (1, 3, 48, 64)


def test_decode_rounds_as_diffusers_and_refuses_non_finite_pixels():
    """The one decode: a numpy or torch image in [0, 1] gives diffusers' uint8 frame, (x * 255).round() in float32 with
    halves to even (exact ties included), HWC; NaN or infinite pixels are refused."""
    from storymaker_serve.runtime.denoise import decode

    rng = np.random.default_rng(0)
    img = rng.random((1, 3, 40, 24), dtype=np.float32)
    img[0, 0, 0, :4] = np.array([0.5, 1.5, 2.5, 254.5], np.float32) / 255     # ties where float32 keeps them exact
    want = (np.transpose(img[0], (1, 2, 0)) * 255).round().astype(np.uint8)
    for given in (img, torch.from_numpy(img)):
        got = decode(lambda _, given=given: given, None)
        assert got.dtype == np.uint8 and got.flags.c_contiguous and np.array_equal(got, want)
    bad = img.copy()
    bad[0, 1, 5, 5] = np.nan
    with pytest.raises(InputError, match="non-finite pixels"):
        decode(lambda _: bad, None)
