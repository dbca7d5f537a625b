"""`python -m export.scale_check` from a checkout: runs `storymaker_serve.export.scale_check`."""
import runpy

runpy.run_module("storymaker_serve.export.scale_check", run_name="__main__", alter_sys=True)
