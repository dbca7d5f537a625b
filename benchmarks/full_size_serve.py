"""`python -m benchmarks.full_size_serve` from a checkout: runs `storymaker_serve.benchmarks.full_size_serve`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.full_size_serve", run_name="__main__", alter_sys=True)
