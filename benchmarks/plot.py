"""`python -m benchmarks.plot` from a checkout: runs `storymaker_serve.benchmarks.plot`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.plot", run_name="__main__", alter_sys=True)
