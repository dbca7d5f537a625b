"""Triton `config.pbtxt` for an exported component, derived from its I/O spec.

The config is built as Triton's own `ModelConfig` protobuf (from tritonclient)
and printed with protobuf's text format, so a field Triton does not know fails
here, at build time, not when the server loads the repository. Dims come from
the spec (-1 for a dynamic axis). With `max_batch_size > 0` the spec's first
axis is the batch axis and is left out of `dims`, as Triton expects; a tensor
left with no dims (a per-sample (N,) vector) is declared as [1] with
`reshape: { shape: [] }`, so the model sees the spec's rank. Scalars are not
allowed (Triton has none): specs use shape (1,).
"""
from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from storymaker_serve.runtime.spec import ComponentSpec

DTYPES = {"float32": pb.TYPE_FP32, "float16": pb.TYPE_FP16, "int64": pb.TYPE_INT64, "int32": pb.TYPE_INT32}
BACKENDS = {"onnxruntime": ("onnxruntime", "model.onnx"), "tensorrt": ("tensorrt", "model.plan"),
            "python": ("python", "model.py")}


def model_config(spec: ComponentSpec, backend: str = "onnxruntime", max_batch_size: int = 0,
                 instances: int = 1, kind: str = "KIND_CPU", zero_default_optional: bool = False) -> pb.ModelConfig:
    """zero_default_optional: inputs the runner fills with zeros (TensorSpec.zero_default) are declared optional;
    only for our Python-backend engine models, which fill them (native backends need every input)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {sorted(BACKENDS)}")
    name, filename = BACKENDS[backend]
    cfg = pb.ModelConfig(name=spec.name, backend=name, max_batch_size=max_batch_size, default_model_filename=filename)
    batched = max_batch_size > 0
    for tensors, field in ((spec.inputs, cfg.input), (spec.outputs, cfg.output)):
        for t in tensors:
            dims = spec.triton_dims(t, batch_dim=batched)
            entry = field.add(name=t.name, data_type=DTYPES[t.dtype], dims=dims or [1])
            if field is cfg.input and zero_default_optional and t.zero_default:
                entry.optional = True
            if not dims and batched:    # a per-sample (N,) vector: [1] per request outside, [] to the model
                entry.reshape.SetInParent()
            elif not dims:
                raise ValueError(f"{spec.name}.{t.name}: Triton has no scalar tensors; give it shape (1,) in the spec")
    cfg.instance_group.add(count=instances, kind=getattr(pb.ModelInstanceGroup, kind))
    return cfg


def to_pbtxt(cfg: pb.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_pbtxt(text: str) -> pb.ModelConfig:
    return text_format.Parse(text, pb.ModelConfig())
