"""Measure torch.onnx's two exporters on every demo component: export seconds and parity vs PyTorch.

`python -m benchmarks.exporters` exports each component of the demo bundle
with the TorchScript-based exporter (dynamo=False) and the dynamo exporter
(dynamo=True), runs both files through the same parity check as the build, and
prints one JSON line per (component, exporter). The figures behind the
exporter choice in docs/export.md come from this script.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from storymaker_serve.export.build import _profile, parse_args
from storymaker_serve.export.demo_bundle import write_demo_bundle
from storymaker_serve.export.onnx_export import torch_inputs
from storymaker_serve.export.parity import check
from storymaker_serve.export.stage import Stage
from storymaker_serve.runtime.cli import argument_parser
from storymaker_serve.runtime.weights import WeightsLayout


def main(argv=None) -> None:
    argument_parser("python -m benchmarks.exporters", __doc__).parse_args(argv)   # --help, -v; starts nothing

    with tempfile.TemporaryDirectory() as tmp:
        weights = write_demo_bundle(Path(tmp) / "bundle")
        a = parse_args(["--weights", str(weights), "--out", tmp])
        stage = Stage(WeightsLayout.from_dir(weights), a, _profile(a, weights))
        for name in stage.specs():
            c = stage.component(name)
            for dynamo in (False, True):
                path = Path(tmp) / f"{name}_{dynamo}.onnx"
                t0 = time.perf_counter()
                try:
                    torch.onnx.export(c.graph, torch_inputs(c.spec, c.spec.assignment("opt")), str(path),
                                      input_names=[t.name for t in c.spec.inputs],
                                      output_names=[t.name for t in c.spec.outputs],
                                      opset_version=17 if not dynamo else 20,
                                      dynamo=dynamo, dynamic_axes=c.spec.dynamic_axes())
                    secs = time.perf_counter() - t0
                    p = check(c.spec, path, c.reference)
                    row = {"seconds": round(secs, 2), "max_abs_err": p.max_abs_err, "status": p.status}
                except Exception as e:  # record why an exporter failed on a component
                    row = {"seconds": round(time.perf_counter() - t0, 2), "status": f"export failed: {str(e)[:120]}"}
                print(json.dumps({"component": name, "exporter": "dynamo" if dynamo else "torchscript",
                                  "torch": torch.__version__, "host": platform.node(), **row}), flush=True)


if __name__ == "__main__":
    main()
