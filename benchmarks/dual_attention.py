"""`python -m benchmarks.dual_attention` from a checkout: runs `storymaker_serve.benchmarks.dual_attention`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.dual_attention", run_name="__main__", alter_sys=True)
