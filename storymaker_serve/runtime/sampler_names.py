"""The sampler and timestep-spacing names every interface accepts (CLI flags, story files, served inputs), kept
apart from runtime/schedulers.py so the light modules (command lines, the serving contract) can list them
without importing diffusers."""

SCHEDULERS = ("unipc", "dpmpp-2m", "dpmpp-2m-karras", "euler", "euler-a", "ddim", "lcm", "tcd")
SPACINGS = ("leading", "trailing", "linspace")
