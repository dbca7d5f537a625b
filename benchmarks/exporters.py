"""`python -m benchmarks.exporters` from a checkout: runs `storymaker_serve.benchmarks.exporters`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.exporters", run_name="__main__", alter_sys=True)
