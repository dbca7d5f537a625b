"""`python -m export.refit` from a checkout: runs `storymaker_serve.export.refit`."""
import runpy

runpy.run_module("storymaker_serve.export.refit", run_name="__main__", alter_sys=True)
