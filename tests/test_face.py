"""buffalo_l path through the real insightface FaceAnalysis (demo ONNX files with the real I/O signature)."""
import numpy as np
import pytest
from helpers import DATA

from storymaker_serve.runtime.errors import InputError, WeightsError
from storymaker_serve.runtime.face import FaceAnalyzer, FaceInfo
from storymaker_serve.runtime.preprocess import decode_image


@pytest.fixture(scope="module")
def analyzer(bundle):
    return FaceAnalyzer.from_folder(bundle / "buffalo_l")


@pytest.mark.parametrize("photo", ["ldh.png", "tsy.png", "two_people.jpg"])
def test_detects_largest_face_and_embeds(analyzer, bundle, photo):
    analyzer_folder = bundle / "buffalo_l"
    img = decode_image(DATA / photo)
    info = analyzer(img, photo)
    assert isinstance(info, FaceInfo) and info.kps.shape == (5, 2)
    assert abs(np.linalg.norm(info.embedding) - 1) < 1e-5
    # it is the largest of insightface's own detections, and its embedding is ArcFace's on that face
    bgr = np.ascontiguousarray(img[:, :, ::-1])
    boxes, kpss = analyzer.det.detect(bgr, max_num=0)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert np.array_equal(info.kps, kpss[np.argmax(areas)])
    from insightface.app import FaceAnalysis  # insightface's own app over the same folder

    app = FaceAnalysis(name=str(analyzer_folder), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    faces = app.get(bgr)   # recognises every face
    same = [f for f in faces if np.array_equal(f.kps, info.kps)]
    assert same and np.allclose(same[0].normed_embedding, info.embedding, atol=1e-6)


def test_no_face_is_a_clear_error(analyzer):
    with pytest.raises(InputError, match="no face found"):
        analyzer(np.full((256, 256, 3), 128, np.uint8), "blank.png")


def test_missing_buffalo_file(tmp_path):
    (tmp_path / "det_10g.onnx").write_bytes(b"")
    with pytest.raises(WeightsError, match="w600k_r50.onnx: missing"):
        FaceAnalyzer.from_folder(tmp_path)
