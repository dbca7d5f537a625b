"""Serving StoryMaker on Triton Inference Server.

- `engines`: the build's ONNX engines, driven by its manifest (runtime/manifest.py).
- `logic`: what each served model computes (text, characters, validation), free of Triton imports.
- `glue`: the Triton Python-backend helpers the thin `triton_repo/*/1/model.py` files call.
- `launcher`: starts a real `tritonserver` on a repository (`python -m runtime.serve`).
- `client`: the gRPC client and story CLI (`python -m runtime.client`).
"""
