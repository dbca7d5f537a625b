"""`python -m benchmarks.run` from a checkout: runs `storymaker_serve.benchmarks.run`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.run", run_name="__main__", alter_sys=True)
