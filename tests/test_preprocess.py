"""(d) Preprocessing of the real photo/mask pairs: crop box, 224 character image, aligned face, CLIP input."""
import io

import numpy as np
import pytest
from helpers import DATA
from PIL import Image

from storymaker_serve.runtime.errors import InputError
from storymaker_serve.runtime.face import FaceInfo
from storymaker_serve.runtime.preprocess import aligned_face, character_image, clip_pixels, decode_image, mask_bbox

# the two-person mask is colour-coded: person 1 in the blue channel, person 2 in the green one
PAIRS = [("ldh.png", "ldh_mask.png", 0), ("tsy.png", "tsy_mask.png", 0),
         ("two_people.jpg", "two_people_mask.png", 2), ("two_people.jpg", "two_people_mask.png", 1)]


@pytest.mark.parametrize("photo,mask,channel", PAIRS)
def test_crop_box_equals_numpy_bbox(photo, mask, channel):
    from storymaker_serve.runtime.characters import Character

    m = Character.load(DATA / photo, DATA / mask, mask_channel=channel).mask
    ys, xs = np.nonzero(np.asarray(Image.open(DATA / mask).convert("RGB"))[:, :, channel] > 0)  # non-black pixels
    want = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert mask_bbox(m) == want
    img = character_image(decode_image(DATA / photo), m)
    assert img.size == (224, 224) and img.mode == "RGB"


def test_composite_is_white_outside_mask():
    photo = np.zeros((64, 64, 3), np.uint8)     # black photo
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[10:50, 20:40] = 255
    mask[10:20, 20:30] = 0                      # a hole in the top-left corner -> white after compositing
    arr = np.asarray(character_image(photo, mask))
    assert arr[0, 0].min() > 250 and arr[160, 112].max() < 5


@pytest.mark.parametrize("name", ["ldh", "tsy"])
def test_aligned_face_and_clip_pixels(name):
    photo = decode_image(DATA / f"{name}.png")
    face = FaceInfo.from_json(DATA / f"{name}.face.json")
    aligned = aligned_face(photo, face.kps)
    assert aligned.shape == (224, 224, 3) and aligned.dtype == np.uint8
    px = clip_pixels([aligned, character_image(photo, decode_image(DATA / f"{name}_mask.png"))])
    assert px.shape == (2, 3, 224, 224)
    # CLIP normalisation: (x/255 - mean)/std, so values lie within [(0-mean)/std, (1-mean)/std]
    assert px.min() >= -1.80 and px.max() <= 2.15


def test_empty_mask_is_a_clear_error():
    with pytest.raises(InputError, match="mask is empty"):
        character_image(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8), "hero")
    with pytest.raises(InputError, match="mask_channel"):   # colour-coded mask read at channel 0
        character_image(decode_image(DATA / "two_people.jpg"), decode_image(DATA / "two_people_mask.png"))


def test_mask_photo_size_mismatch():
    with pytest.raises(InputError, match="mask is 16x32 but the photo is 32x32"):
        character_image(np.zeros((32, 32, 3), np.uint8), np.full((32, 16, 3), 255, np.uint8))


def test_undecodable_and_oversized_images():
    with pytest.raises(InputError, match="cannot decode"):
        decode_image(b"not an image", "photo")
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG")
    with pytest.raises(InputError, match="exceeds the limit"):
        decode_image(buf.getvalue(), "photo", max_pixels=256 * 256)


def test_face_json_validation(tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text('{"kps": [[0, 0]], "embedding": []}')
    with pytest.raises(InputError, match="5x2"):
        FaceInfo.from_json(bad)
    emb = FaceInfo.from_json(DATA / "ldh.face.json").embedding
    assert abs(np.linalg.norm(emb) - 1) < 1e-6


def test_resize_filter_is_the_releases():
    """The release resizes the composite and the cloth with `Image.resize((224, 224))`, no filter argument:
    Pillow's default for RGB, bicubic. Ours equals that computation, which differs from bilinear."""
    import cv2

    from storymaker_serve.runtime.characters import Character
    from storymaker_serve.runtime.preprocess import cloth_image

    c = Character.load(DATA / "ldh.png", DATA / "ldh_mask.png")
    x0, y0, x1, y1 = mask_bbox(c.mask)
    crop = c.photo[y0:y1, x0:x1].astype(np.float64)
    m = cv2.GaussianBlur(c.mask[y0:y1, x0:x1], (5, 5), 0) / 255.0
    comp = Image.fromarray((255.0 * (1.0 - m) + m * crop).astype(np.uint8))
    release = np.asarray(comp.resize((224, 224)))                              # the release's line
    ours = np.asarray(character_image(c.photo, c.mask))
    assert np.array_equal(ours, release)
    assert np.array_equal(release, np.asarray(comp.resize((224, 224), Image.BICUBIC)))   # Pillow's default
    assert not np.array_equal(ours, np.asarray(comp.resize((224, 224), Image.BILINEAR)))
    cloth = decode_image(DATA / "cloth1.png")
    assert np.array_equal(np.asarray(cloth_image(cloth)), np.asarray(Image.fromarray(cloth).resize((224, 224))))
    assert not np.array_equal(np.asarray(cloth_image(cloth)),
                              np.asarray(Image.fromarray(cloth).resize((224, 224), Image.BILINEAR)))


def _jpeg(arr, orientation=None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(buf, format="JPEG", quality=100, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied():
    """A phone JPEG stored sideways with EXIF orientation 6 decodes upright: with the mask drawn as displayed it
    gives the same character crop as the upright photo (same box, pixels within JPEG noise)."""
    from storymaker_serve.runtime.characters import Character

    upright = decode_image(DATA / "ldh.png")
    stored_sideways = np.rot90(upright, 1).copy()            # what the sensor wrote; orientation 6 turns it back
    phone = decode_image(_jpeg(stored_sideways, orientation=6))
    assert phone.shape == upright.shape
    ref = Character.load(_jpeg(upright), DATA / "ldh_mask.png")
    got = Character.load(_jpeg(stored_sideways, orientation=6), DATA / "ldh_mask.png")
    assert mask_bbox(got.mask) == mask_bbox(ref.mask)
    a, b = (np.asarray(character_image(c.photo, c.mask), np.int16) for c in (ref, got))
    assert np.abs(a - b).mean() < 2.0
    sideways = Character.load(_jpeg(stored_sideways), DATA / "ldh_mask.png")       # no EXIF: sideways, as stored
    with pytest.raises(InputError, match="mask is 448x640 but the photo is 640x448"):
        character_image(sideways.photo, sideways.mask)


def test_formats_outside_the_allow_list_are_refused_by_name(tmp_path):
    """EPS (which Pillow would hand to Ghostscript), GIF, TIFF, PDF are refused by name before any decoder runs;
    WEBP is accepted."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InputError, match="photo: EPS/PostScript images are not accepted; send PNG, JPEG, WEBP"):
        decode_image(eps, "photo")
    for fmt, label in (("GIF", "GIF"), ("TIFF", "TIFF"), ("BMP", "BMP")):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=fmt)
        with pytest.raises(InputError, match=f"{label} images are not accepted"):
            decode_image(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 20, 30)).save(buf, format="WEBP", lossless=True)
    assert decode_image(buf.getvalue()).shape == (24, 32, 3)
