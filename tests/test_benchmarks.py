"""The benchmark harness on a tiny config: JSON lines with every flag, versions, memory; charts. No timing asserted."""
import json

from benchmarks import plot, run

REQUIRED = {"backend", "weights", "size", "steps", "characters", "precision", "dual_attention_kernel", "channels_last",
            "cuda_graph", "compile", "device_name", "torch", "git_commit", "median_s", "p90_s", "runs_s",
            "peak_host_rss_bytes", "peak_gpu_mem_bytes", "time"}


def test_harness_writes_json_lines_and_charts(tmp_path, built):
    out = tmp_path / "runs.jsonl"
    lines = run.main(["--backends", "reference,torch-opt,onnxruntime", "--weights", "demo", "--build", str(built),
                      "--size", "64", "--steps", "2", "--repeats", "2", "--warmup", "1", "--channels-last",
                      "--out", str(out)])
    stored = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["backend"] for l in stored] == ["reference", "torch-opt", "onnxruntime"] == [l["backend"] for l in lines]
    for l in stored:
        assert REQUIRED <= set(l), REQUIRED - set(l)
        assert len(l["runs_s"]) == 2 and l["median_s"] > 0 and l["peak_host_rss_bytes"] > 0
        assert set(l["stages_median_s"]) == {"encoders+ppr", "text", "denoise", "vae"}
        assert l["channels_last"] is True and l["size"] == 64
    for name in ("latency_by_backend.png", "speedup.png"):          # run draws the charts next to its results
        assert (tmp_path / name).stat().st_size > 1000
    pngs = plot.main(["--results", str(out), "--out", str(tmp_path / "again")])
    assert {p.name for p in pngs} == {"latency_by_backend.png", "speedup.png"}


def test_quick_flags():
    a = run.parse_args(["--quick"])
    assert a.backends == "reference,torch-opt,onnxruntime,triton" and a.weights == "demo" and a.steps == 8
