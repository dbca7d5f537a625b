"""Stand-in engines for `benchmarks.serving_overhead`: what our serving code adds around the engines, measured
with engines that answer at once. They say nothing about an engine's speed or correctness.

A build whose manifest names `storymaker_serve.benchmarks.standin:StandInEngine` as its
`deployment.engine_factory` gets one of these for every component (runtime.serving.engines.Build.engine).
"""
from __future__ import annotations

import numpy as np
import torch

from storymaker_serve.runtime.manifest import Component
from storymaker_serve.runtime.serving.engines import OrtEngine

FACTORY = "storymaker_serve.benchmarks.standin:StandInEngine"


class StandInEngine(OrtEngine):
    """An OrtEngine without a session that answers at once with correctly shaped zero outputs (shapes bound from the
    inputs by the spec; absent optional inputs are not filled)."""

    def __init__(self, record: Component):
        self.record, self.inputs, self.outputs = record, record.input_names, record.output_names
        self.profile, self.device = record.profile, "cpu"
        self._out: dict = {}

    def complete(self, feeds, bound: bool = False, values: dict | None = None):
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zero outputs, allocated once per shape (our code never writes into an engine's outputs): an engine writes
        its outputs into memory that is already there (I/O binding, TensorRT), so a stand-in that allocated and zeroed
        hundreds of MB per call (the ControlNet's residuals) would add its own cost to the overhead measured around
        it."""
        spec = self.record.spec
        values = spec.bind({k: tuple(v.shape) for k, v in feeds.items() if k in self.inputs})
        out = {}
        for t in spec.outputs:
            key = (t.name, t.shape(values))
            if key not in self._out:
                self._out[key] = np.zeros(key[1], np.dtype(t.dtype))
            out[t.name] = self._out[key]
        return out

    def run_bound(self, feeds: dict) -> dict:
        """`run` with torch tensors in and out (on the host: a stand-in has no device)."""
        return {k: torch.from_numpy(v) for k, v in self.run(feeds).items()}
