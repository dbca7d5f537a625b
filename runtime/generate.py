"""`python -m runtime.generate` from a checkout: runs `storymaker_serve.runtime.generate`."""
import runpy

runpy.run_module("storymaker_serve.runtime.generate", run_name="__main__", alter_sys=True)
