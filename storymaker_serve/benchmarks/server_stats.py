"""What a running deployment reports about itself: tritonserver's per-model statistics and the storymaker model's
stage counters on the metrics port. Used by the load and serving-overhead benchmarks."""
from __future__ import annotations

import re
import urllib.request


def stage_metrics(port: int) -> dict[str, float]:
    """The storymaker model's own counters from the metrics port: `<stage>.seconds`, `<stage>.count`,
    `<engine>.rows`, `<engine>.executions` (runtime/serving/sampling.py)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'storymaker_(stage|engine)_(seconds|count|rows|executions)_total\{(.*)\} ([0-9.e+-]+)', line)
        if m and 'model="storymaker"' in m.group(3):
            key = re.search(r'(?:stage|engine)="([^"]+)"', m.group(3)).group(1)
            out[f"{key}.{m.group(2)}"] = float(m.group(4))
    return out


def model_stats(admin, model: str) -> dict[str, int]:
    """tritonserver's statistics of one model: rows (inference count), executions, compute and queue ns."""
    s = admin.get_inference_statistics(model, as_json=True)["model_stats"][0]
    st = s.get("inference_stats", {})
    ns = lambda k: int(st.get(k, {}).get("ns", 0))
    return {"rows": int(s.get("inference_count", 0)), "executions": int(s.get("execution_count", 0)),
            "compute_ns": ns("compute_infer") + ns("compute_input") + ns("compute_output"), "queue_ns": ns("queue")}
