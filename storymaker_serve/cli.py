"""Console scripts (`storymaker-build`, `-serve`, `-client`, `-generate`, `-bench`, `-refit`): the same entry
points as `python -m export.build`, `runtime.serve`, `runtime.client`, `runtime.generate`, `benchmarks.run`,
`export.refit` in a checkout. Each imports its command only when run (a script's start-up pays for its own
imports, not for every command's)."""


def build() -> int:
    from storymaker_serve.export.build import main

    return main()


def serve() -> int:
    from storymaker_serve.runtime.serving.launcher import main

    return main()


def client() -> int:
    from storymaker_serve.runtime.serving.client import main

    return main()


def generate() -> int:
    from storymaker_serve.runtime.generate import main

    return main()


def bench() -> int:
    from storymaker_serve.benchmarks.run import main

    main()
    return 0


def refit() -> int:
    from storymaker_serve.export.refit import main

    return main()
