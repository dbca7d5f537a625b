"""`python -m runtime.client` from a checkout: runs `storymaker_serve.runtime.serving.client`."""
import runpy

runpy.run_module("storymaker_serve.runtime.serving.client", run_name="__main__", alter_sys=True)
