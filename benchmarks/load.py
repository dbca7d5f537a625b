"""`python -m benchmarks.load` from a checkout: runs `storymaker_serve.benchmarks.load`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.load", run_name="__main__", alter_sys=True)
