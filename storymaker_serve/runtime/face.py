"""Face information per character: insightface `buffalo_l` detection + ArcFace, or a JSON file.

The release runs `FaceAnalysis(name="buffalo_l")` on the BGR photo and keeps
the largest face by bbox area: its 5 keypoints (`kps`) and the L2-normalised
512-d ArcFace embedding (`normed_embedding`). `FaceAnalyzer` does the same with
a local buffalo_l folder (insightface's own SCRFD and ArcFace classes; the
recognizer runs only on the chosen face, which gives the same numbers as
recognising all faces). `FaceInfo.from_json` reads `{"kps": 5x2, "embedding":
512}` for users who computed face info elsewhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from insightface.app.common import Face
from insightface.model_zoo import get_model

from storymaker_serve.runtime.errors import InputError, WeightsError

EMBED_DIM = 512


@dataclass
class FaceInfo:
    kps: np.ndarray        # (5, 2) float32, pixel coordinates in the original photo
    embedding: np.ndarray  # (512,) float32, L2-normalised

    def __post_init__(self):
        try:
            self.kps = np.asarray(self.kps, dtype=np.float32)
            emb = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise InputError(f"face info: kps and embedding must be numbers ({e})") from None
        if self.kps.shape != (5, 2):
            raise InputError(f"face info: kps must be 5x2 keypoints, got shape {self.kps.shape}")
        if emb.shape != (EMBED_DIM,) or not np.isfinite(emb).all() or not np.isfinite(self.kps).all():
            raise InputError(f"face info: embedding must be {EMBED_DIM} finite numbers (got shape {emb.shape})")
        norm = float(np.linalg.norm(emb))
        if norm == 0.0:
            raise InputError("face info: embedding is all zeros")
        self.embedding = emb / norm

    @classmethod
    def from_json(cls, path: Path | str) -> FaceInfo:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise InputError(f"face info file {path} not found") from None
        return cls.from_text(text, f"face info file {path}")

    @classmethod
    def from_text(cls, text: str, source: str = "face info") -> FaceInfo:
        """Parse face-info JSON text (a file's content or a request's FACE_INFO element)."""
        try:
            d = json.loads(text)
            return cls(d["kps"], d["embedding"])
        except (KeyError, json.JSONDecodeError, TypeError, AttributeError) as e:
            raise InputError(f"{source}: expected JSON with 'kps' (5x2) and 'embedding' (512): {e}") from None

    def check_inside(self, width: int, height: int, source: str = "face info") -> None:
        """Keypoints are photo pixels: all five must lie on the photo (a JSON made for another photo or size
        would align the wrong face)."""
        x, y = self.kps[:, 0], self.kps[:, 1]
        if (x < 0).any() or (y < 0).any() or (x > width).any() or (y > height).any():
            raise InputError(f"{source}: keypoints {self.kps.round(1).tolist()} fall outside the {width}x{height} "
                             "photo; give the keypoints of this photo, in its pixels (as displayed)")

    def to_json(self) -> str:
        return json.dumps({"kps": self.kps.tolist(), "embedding": self.embedding.tolist()})


class FaceAnalyzer:
    """insightface SCRFD detector + ArcFace recognizer from two ONNX files (buffalo_l's or a build's copies).

    Equivalent to `FaceAnalysis(allowed_modules=["detection", "recognition"]).prepare(det_size=640)`:
    the same insightface classes (routed by `model_zoo.get_model`), prepared the same way."""

    def __init__(self, det_path: Path | str, rec_path: Path | str, det_size: tuple[int, int] = (640, 640),
                 providers=None):
        for f in (det_path, rec_path):
            if not Path(f).exists():
                raise WeightsError(f"{f}: missing (insightface buffalo_l). Unpack buffalo_l.zip there, or give each "
                                   "character a face-info JSON instead.")
        providers = providers or ["CPUExecutionProvider"]
        self.det = get_model(str(det_path), providers=providers)
        self.rec = get_model(str(rec_path), providers=providers)
        if (self.det is None or self.det.taskname != "detection"
                or self.rec is None or self.rec.taskname != "recognition"):
            raise WeightsError(f"{det_path} / {rec_path}: not an insightface detector / recognizer pair")
        self.det.prepare(ctx_id=-1, input_size=det_size, det_thresh=0.5)
        self.rec.prepare(ctx_id=-1)

    @classmethod
    def from_folder(cls, folder: Path | str, **kw) -> FaceAnalyzer:
        folder = Path(folder)
        return cls(folder / "det_10g.onnx", folder / "w600k_r50.onnx", **kw)

    def __call__(self, photo_rgb: np.ndarray, name: str = "photo") -> FaceInfo:
        bgr = np.ascontiguousarray(photo_rgb[:, :, ::-1])
        boxes, kpss = self.det.detect(bgr, max_num=0, metric="default")
        if boxes.shape[0] == 0:
            raise InputError(f"{name}: no face found. Use a photo with a clearly visible face, or pass face info as "
                             "JSON (kps 5x2 + 512-d embedding).")
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        i = int(np.argmax(area))  # the release keeps the largest face
        face = Face(bbox=boxes[i, :4], kps=kpss[i], det_score=boxes[i, 4])
        self.rec.get(bgr, face)
        return FaceInfo(face.kps, face.embedding)
