"""`python -m benchmarks.samplers` from a checkout: runs `storymaker_serve.benchmarks.samplers`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.samplers", run_name="__main__", alter_sys=True)
