"""`python -m benchmarks.device_check` from a checkout: runs `storymaker_serve.benchmarks.device_check`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.device_check", run_name="__main__", alter_sys=True)
