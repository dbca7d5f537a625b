"""`python -m export.demo_bundle` from a checkout: runs `storymaker_serve.export.demo_bundle`."""
import runpy

runpy.run_module("storymaker_serve.export.demo_bundle", run_name="__main__", alter_sys=True)
