"""`python -m export.build` from a checkout: runs `storymaker_serve.export.build`."""
import runpy

runpy.run_module("storymaker_serve.export.build", run_name="__main__", alter_sys=True)
