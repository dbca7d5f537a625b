"""`python -m benchmarks.serving_overhead` from a checkout: runs `storymaker_serve.benchmarks.serving_overhead`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.serving_overhead", run_name="__main__", alter_sys=True)
