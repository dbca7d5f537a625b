"""storymaker-serve: export, serve and benchmark StoryMaker (consistent-character SDXL) on Triton.

One package, imported as `storymaker_serve.*` everywhere (checkout and installed alike):
- `storymaker_serve.runtime`: what a server needs to run StoryMaker (models, loaders, the loop, serving);
- `storymaker_serve.export`: what a build needs (ONNX, TensorRT, parity, the Triton repository);
- `storymaker_serve.kernels`: the fused dual-stream attention kernel (OpenAI Triton);
- `storymaker_serve.benchmarks`: latency and throughput harnesses;
- `storymaker_serve.triton_repo`: the Python-backend glue copied into a build's model repository.

A checkout's top-level `export/`, `runtime/` and `benchmarks/` folders hold only entry modules
(`python -m export.build` runs `storymaker_serve.export.build`); the console scripts are in `cli.py`.
"""
__version__ = "0.2.0"
