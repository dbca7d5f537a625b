"""`python -m export.refit`: another StoryMaker `lora_scale` or style LoRA into a built, refittable UNet engine.

Steps: re-export the UNet ONNX with the new LoRA settings (the same spec, profile, precision and opset as the
build, parity checked as in `export.build`) into `BUILD/refit/`, check that its weights carry exactly the names
of the engine's source ONNX (TensorRT's `OnnxParserRefitter` matches weights by initializer name; export keeps
them stable, see `onnx_export.stable_weight_names`), then refit the engine (`export/tensorrt.refit_engine`).
The TensorRT step is WRITTEN, NOT RUN (it has not run with TensorRT yet); everything before it runs on a CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

from storymaker_serve.export import manifest as mf
from storymaker_serve.export.tensorrt import availability, refit_engine
from storymaker_serve.runtime.cli import argument_parser, configure_logging
from storymaker_serve.runtime.errors import StoryMakerError, cli_exit
from storymaker_serve.runtime.manifest import Manifest

LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")          # runtime.adapter.LORA_TARGETS' Linear layers


def weight_names(path: Path) -> dict[str, tuple[int, ...]]:
    """Initializer name -> shape of an ONNX file (external data not read)."""
    m = onnx.load(str(path), load_external_data=False)
    return {t.name: tuple(t.dims) for t in m.graph.initializer}


def lora_weight_names(names) -> list[str]:
    """The weight initializers of the LoRA-affected projections (every attn1/attn2 to_q, to_k, to_v, to_out.0;
    the LoRA changes weights, not to_out's bias)."""
    return sorted(n for n in names if not n.endswith(".bias")
                  and any(f".{a}.{layer}." in n for a in ("attn1", "attn2") for layer in LORA_LAYERS))


def check_refit_names(engine_onnx: Path, new_onnx: Path) -> list[str]:
    """Raise unless both files name and shape their weights identically; returns the LoRA-affected names."""
    a, b = weight_names(engine_onnx), weight_names(new_onnx)
    if a != b:
        only_a, only_b = sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]
        reshaped = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:5]
        raise StoryMakerError(f"{new_onnx}: its weights do not match the engine's source {engine_onnx} by name and "
                              f"shape (only in the engine's: {only_a}; only in the new one: {only_b}; reshaped: "
                              f"{reshaped}). Refit needs the same graph: rebuild the engine with `python -m "
                              "export.build ... --engines auto --refittable`.")
    lora = lora_weight_names(a)
    if not lora:
        raise StoryMakerError(f"{engine_onnx}: no LoRA-affected projection weight found by name; re-export it with "
                              "this version of export.build (stable weight names)")
    return lora


def parse_args(argv=None) -> argparse.Namespace:
    ap = argument_parser("python -m export.refit", __doc__)
    ap.add_argument("--build", type=Path, required=True, help="build folder with a refittable UNet engine")
    ap.add_argument("--weights", type=Path, required=True, help="the weights folder the build was made from")
    ap.add_argument("--lora-scale", type=float, default=0.8, help="StoryMaker LoRA scale to fuse")
    ap.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="style LoRA (repeatable)")
    ap.add_argument("--out", type=Path, help="write the refitted engine here (default: replace the build's engine)")
    ap.add_argument("--dry-run", action="store_true", help="re-export and check weight names; skip TensorRT")
    return ap.parse_args(argv)


def refit(a) -> int:
    from storymaker_serve.export.build import main as build_main

    m = Manifest(a.build)
    unet = m.component("unet")
    engine = unet.engine
    if not a.dry_run:
        if engine.get("status") != "built" or not engine.get("refittable"):
            raise StoryMakerError(f"{a.build}: no refittable UNet engine (engine status: "
                                  f"{engine.get('status', 'none')}); "
                                  "build one with `python -m export.build ... --engines auto --refittable`")
        ok, why = availability()
        if not ok:
            raise StoryMakerError(f"cannot refit here: {why}")
    work = a.build / "refit"
    argv = ["--weights", str(a.weights), "--out", str(work), "--components", "unet", "--engines", "off",
            "--lora-scale", str(a.lora_scale), "--opset", str(unet.raw["opset"])]
    argv += [x for lora in a.lora for x in ("--lora", lora)]
    p = m.data["profile"]
    argv += ["--min-size", str(p["min_size"]), "--opt-size", str(p["opt_size"]), "--max-size", str(p["max_size"]),
             "--max-batch", str(p["max_batch"]), "--max-characters", str(p["max_characters"])]
    if unet.precision == "fp16":
        argv.append("--fp16")
    print(f"re-exporting the UNet with lora_scale {a.lora_scale}" + (f" and {a.lora}" if a.lora else "") + " ...",
          flush=True)
    rc = build_main(argv)
    if rc:
        return rc
    new_onnx, old_onnx = work / Manifest(work).component("unet").model_file, a.build / unet.model_file
    lora = check_refit_names(old_onnx, new_onnx)
    print(f"weights match by name: {len(weight_names(new_onnx))} initializers, {len(lora)} LoRA-affected", flush=True)
    if a.dry_run:
        print("dry run: TensorRT refit skipped")
        return 0
    target = refit_engine(a.build / engine["path"], new_onnx, a.out, engine.get("version_compatible", False))
    if a.out is None:                    # the build's own engine changed: its manifest says what it now holds
        record_refit(a.build, a.lora_scale, a.lora, target, Manifest(work).component("unet").raw.get("key"),
                     new_onnx)
    print(f"refitted engine: {target}")
    return 0


def record_refit(build: Path, lora_scale: float, loras: list[str], engine_file: Path, unet_key: str | None,
                 new_onnx: Path) -> None:
    """After an in-place refit: the manifest's LoRA settings and the UNet engine record describe the refitted
    engine (its hash, the re-exported ONNX it was refitted from and that export's key)."""
    data = mf.load(build)
    eng = data["components"]["unet"]["engine"]
    eng.update(sha256=mf.sha256_file(engine_file), bytes=engine_file.stat().st_size,
               refit={"lora_scale": lora_scale, "style_loras": list(loras), "component_key": unet_key,
                      "onnx": str(new_onnx.relative_to(build))})
    data["lora_scale"], data["style_loras"] = lora_scale, list(loras)
    mf.write(build, data)


def main(argv=None) -> int:
    a = parse_args(argv)
    configure_logging(a)
    return cli_exit(refit, a)


if __name__ == "__main__":
    sys.exit(main())
