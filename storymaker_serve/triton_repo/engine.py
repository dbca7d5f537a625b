"""Triton model: one exported component (config parameter `component`) run in onnxruntime.

Used for clip_vision, ppr, unet, controlnet and vae_decoder. With dynamic
batching (unet, controlnet) Triton hands over several requests at once; inputs
with matching shapes run as one batch (runtime.serving.engines.OrtEngine.run_batched).
A request with bad shapes gets its own INVALID_ARG error.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from storymaker_serve.runtime.serving.engines import Build
from storymaker_serve.runtime.serving.glue import Glue, setup


class TritonPythonModel:
    def initialize(self, args):
        cfg, params = setup(args)
        self.batched = cfg.get("max_batch_size", 0) > 0
        self.glue = Glue(pb_utils)
        self.engine = Build(params["build_dir"]).engine(params["component"],
                                                        device_id=int(args.get("model_instance_device_id") or 0))
        self.rank = {t.name: len(t.dims) for t in self.engine.record.spec.inputs}
        self.optional = {t.name for t in self.engine.record.spec.inputs if t.zero_default}

    def _feeds(self, request):
        feeds = {}
        for name in self.engine.inputs:
            a = self.glue.array(request, name, required=name not in self.optional)
            if a is not None:                                            # absent residuals: zeros, filled here
                feeds[name] = a.reshape(-1) if self.rank[name] == 1 else a     # (N,) vectors arrive as [N, 1] via BLS
        self.engine.check_profile(feeds, skip_batch=self.batched)
        return self.engine.complete(feeds)

    def execute(self, requests):
        responses, feeds, idx = [None] * len(requests), [], []
        for i, r in enumerate(requests):
            try:
                feeds.append(self._feeds(r))
                idx.append(i)
            except Exception as e:  # noqa: BLE001 - this request only
                responses[i] = self.glue.error(e)
        if feeds:
            try:
                outs = self.engine.run_batched(feeds) if len(feeds) > 1 else [self.engine.run(feeds[0])]
                for i, o in zip(idx, outs):
                    responses[i] = self.glue.respond({k: np.asarray(v) for k, v in o.items()})
            except Exception as e:  # noqa: BLE001
                for i in idx:
                    responses[i] = self.glue.error(e)
        return responses
