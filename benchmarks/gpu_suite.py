"""`python -m benchmarks.gpu_suite` from a checkout: runs `storymaker_serve.benchmarks.gpu_suite`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.gpu_suite", run_name="__main__", alter_sys=True)
