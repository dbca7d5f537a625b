"""Story files and the one story runner: a bad story is one line naming the file and the key (exit 2, no
traceback) for the local and the remote command alike; the client reports a wrong address within its connect
timeout; StoryMakerClient takes PIL images, numpy arrays and insightface faces."""
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import DATA, STORY
from PIL import Image

from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.generate import main as generate_main
from storymaker_serve.runtime.preprocess import decode_image
from storymaker_serve.runtime.serving.client import StoryMakerClient, _bytes
from storymaker_serve.runtime.serving.client import main as client_main
from storymaker_serve.runtime.serving.ports import free_port
from storymaker_serve.runtime.story import Story, check_story

GOOD = f"""characters:
  - {{name: man, photo: {DATA}/ldh.png, mask: {DATA}/ldh_mask.png}}
frames:
  - prompt: a man in a park
"""
BAD = {
    "malformed YAML": ("characters: [unclosed\nframes: x", r"not valid YAML at line \d+, column \d+"),
    "empty file": ("", "the story is empty"),
    "top-level list": ("- a\n- b\n", "the top level must be a mapping"),
    "missing photo": (GOOD.replace("ldh.png", "nobody.png"), r"characters\.0\.photo: file not found: .*nobody\.png"),
    "steps not a number": (GOOD + "    steps: many\n", r"frames\.0\.steps: Input should be a valid integer.*'many'"),
    "unknown key": (GOOD + "    colour: red\n", r"frames\.0\.colour: Extra inputs are not permitted"),
    "unknown character": (GOOD + "  - {prompt: x, characters: [woman]}\n",
                          r"frame 2: unknown characters \['woman'\]; the story defines \['man'\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_stories_are_one_line_and_exit_2(case, tmp_path, capsys):
    text, message = BAD[case]
    story = tmp_path / "story.yaml"
    story.write_text(text)
    with pytest.raises(InputError, match=message):
        check_story(Story.load(story))
    for run in (lambda: generate_main(["--weights", str(tmp_path / "none"), "--story", str(story)]),
                lambda: client_main([str(story), "--url", f"127.0.0.1:{free_port()}", "--connect-timeout", "1"])):
        assert run() == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert "unknown character" in case or str(story) in err


def test_a_good_story_loads_with_absolute_paths(tmp_path):
    (tmp_path / "story.yaml").write_text(GOOD + "defaults: {steps: 4, seed: 3}\n")
    story = Story.load(tmp_path / "story.yaml")
    assert story.characters[0]["photo"] == str(DATA / "ldh.png") and story.defaults == {"steps": 4, "seed": 3}
    [(names, opts, given)] = check_story(story, {"width": 64})
    assert names == ["man"] and (opts.steps, opts.seed, opts.width) == (4, 3, 64)
    assert given == {"steps", "seed", "width"}


def test_a_wrong_port_is_reported_within_the_connect_timeout(tmp_path, capsys):
    (tmp_path / "story.yaml").write_text(GOOD)
    port = free_port()
    t0 = time.monotonic()
    assert client_main([str(tmp_path / "story.yaml"), "--url", f"127.0.0.1:{port}", "--connect-timeout", "1.5"]) == 2
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert f"connecting to the StoryMaker server at 127.0.0.1:{port} (gRPC, up to 1.5 s)" in out
    assert f"cannot reach a ready StoryMaker server at 127.0.0.1:{port} (gRPC) within 1.5 s" in err
    assert took < 6, took


def test_http_wrong_port_too(tmp_path, capsys):
    (tmp_path / "story.yaml").write_text(GOOD)
    assert client_main([str(tmp_path / "story.yaml"), "--protocol", "http", "--url", f"127.0.0.1:{free_port()}",
                        "--connect-timeout", "1"]) == 2
    assert "(HTTP) within 1 s" in capsys.readouterr().err


def test_client_inputs_take_pil_images_numpy_arrays_and_faces():
    """The bytes sent for a PIL image or an array decode on the server to exactly that image; an insightface Face
    becomes the face-info JSON the server reads."""
    photo = decode_image(DATA / "ldh.png")
    for given in (photo, Image.fromarray(photo)):
        assert np.array_equal(decode_image(_bytes(given), "photo"), photo)
    mask = np.asarray(Image.open(DATA / "ldh_mask.png").convert("L"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(_bytes(mask)))), mask)

    class Face:                                            # the attributes insightface's Face has
        kps = np.array([[1.0, 2.0]] * 5, np.float32)
        normed_embedding = np.full(512, 0.04, np.float32)

    info = json.loads(_bytes(Face()))
    assert info["kps"] == [[1.0, 2.0]] * 5 and len(info["embedding"]) == 512
    with pytest.raises(InputError, match="uint8"):
        _bytes(photo.astype(np.float32))
    with pytest.raises(InputError, match="cannot send a dict"):
        _bytes({})
    ins = StoryMakerClient("127.0.0.1:1")._character_inputs([{"photo": Image.fromarray(photo), "mask": mask,
                                                              "face": Face()}])
    assert [i.name() for i in ins] == ["PHOTOS", "MASKS", "FACE_INFO"]


@pytest.mark.slow
def test_pil_and_numpy_characters_give_the_tokens_of_their_files(client):
    paths = {"photo": DATA / "ldh.png", "mask": DATA / "ldh_mask.png", "face": DATA / "ldh.face.json"}
    arrays = {"photo": Image.open(DATA / "ldh.png"), "mask": np.asarray(Image.open(DATA / "ldh_mask.png")),
              "face": Path(paths["face"]).read_bytes()}
    a, b = client.encode_characters([paths]), client.encode_characters([arrays])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.slow
def test_http_client_renders_a_story_with_concurrency(server, tmp_path, capsys):
    """tritonclient's HTTP client is gevent-based: one per thread, so --concurrency 2 over HTTP works."""
    story = STORY
    rc = client_main([str(story), "--protocol", "http", "--url", f"{server.address}:{server.http_port}",
                      "--concurrency", "2", "--steps", "2", "--width", "64", "--height", "64", "--out",
                      str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(list(tmp_path.glob("frame_*.png"))) == 3 and "frame 3/3" in out
