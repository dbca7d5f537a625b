"""Latency and throughput harnesses (`python -m benchmarks.run` and friends in a checkout).

Paths: results and the test photos are the checkout's (`benchmarks/results/`, `tests/data/`); installed,
results go to `./benchmark_results` and the builds to `./build` under the current folder.
"""
from pathlib import Path

from storymaker_serve.examples import DATA

_CHECKOUT = Path(__file__).resolve().parents[2]
CHECKOUT = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()
RESULTS = CHECKOUT / "benchmarks" / "results" if CHECKOUT == _CHECKOUT else CHECKOUT / "benchmark_results"
TEST_DATA = DATA                # the example photos (storymaker_serve/examples/data)
