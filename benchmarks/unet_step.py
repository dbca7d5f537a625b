"""`python -m benchmarks.unet_step` from a checkout: runs `storymaker_serve.benchmarks.unet_step`."""
import runpy

runpy.run_module("storymaker_serve.benchmarks.unet_step", run_name="__main__", alter_sys=True)
