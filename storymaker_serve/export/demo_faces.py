"""Tiny random face models with insightface `buffalo_l`'s ONNX I/O signatures.

`det_10g.onnx` follows SCRFD's signature as insightface's model router and
`SCRFD.forward` read it: one input `input.1` [1, 3, H, W] (H, W dynamic,
multiples of 32), nine outputs (scores, box distances, keypoint offsets for
strides 8, 16, 32, two anchors per location, unbatched rows). `w600k_r50.onnx`
follows ArcFace's: `input.1` [N, 3, 112, 112] -> [N, 512]. Weights are random
and seeded; box distances pass through softplus so decoded boxes are valid.
These files make the real `insightface.app.FaceAnalysis` path run on a CPU; the
faces they "find" are meaningless.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (8, 16, 32)
ANCHORS = 2
SCORE_GAIN, SCORE_BIAS = 5.0, -2.0


class TinySCRFD(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 8, stride=8)
        self.down = nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in STRIDES[1:]])
        self.score = nn.ModuleList([nn.Conv2d(width, ANCHORS, 1) for _ in STRIDES])
        self.box = nn.ModuleList([nn.Conv2d(width, ANCHORS * 4, 1) for _ in STRIDES])
        self.kps = nn.ModuleList([nn.Conv2d(width, ANCHORS * 10, 1) for _ in STRIDES])
        with torch.no_grad():
            # Structured, not arbitrary: zero-mean stem filters and zero biases give no features on a flat
            # image (no face found there); positive score weights fire on textured regions, and the score
            # bias keeps only the strongest few anchors above insightface's 0.5 threshold.
            self.stem.weight.sub_(self.stem.weight.mean(dim=(1, 2, 3), keepdim=True))
            for conv in (self.stem, *self.down):
                conv.bias.zero_()
            for head in self.score:
                head.weight.abs_().mul_(SCORE_GAIN)
                head.bias.fill_(SCORE_BIAS)

    def forward(self, x: torch.Tensor):
        feats = [F.relu(self.stem(x))]
        for conv in self.down:
            feats.append(F.relu(conv(feats[-1])))
        rows = lambda t, k: t.permute(0, 2, 3, 1).reshape(-1, k)  # (H*W*A, k), location-major
        scores = [rows(torch.sigmoid(h(f)), 1) for h, f in zip(self.score, feats)]
        boxes = [rows(F.softplus(h(f)) + 1.0, 4) for h, f in zip(self.box, feats)]
        kps = [rows(h(f), 10) for h, f in zip(self.kps, feats)]
        return (*scores, *boxes, *kps)


class TinyArcFace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 4, stride=4)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=4)
        self.fc = nn.Linear(32 * 7 * 7, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def write_buffalo_l(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)  # own seed: the detection counts on the test photos depend on it
    det = TinySCRFD().eval()
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    torch.onnx.export(det, (torch.zeros(1, 3, 640, 640),), str(out / "det_10g.onnx"), input_names=["input.1"],
                      output_names=names, dynamic_axes={"input.1": {2: "h", 3: "w"}}, opset_version=17, dynamo=False)
    rec = TinyArcFace().eval()
    torch.onnx.export(rec, (torch.zeros(1, 3, 112, 112),), str(out / "w600k_r50.onnx"), input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}},
                      opset_version=17, dynamo=False)
