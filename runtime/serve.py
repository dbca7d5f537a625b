"""`python -m runtime.serve` from a checkout: runs `storymaker_serve.runtime.serving.launcher`."""
import runpy

runpy.run_module("storymaker_serve.runtime.serving.launcher", run_name="__main__", alter_sys=True)
