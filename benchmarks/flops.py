"""`python -m benchmarks.flops` from a checkout: runs `storymaker_serve.benchmarks.flops`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.flops", run_name="__main__", alter_sys=True)
