"""Console scripts (`storymaker-build`, `-serve`, `-client`, `-generate`, `-bench`, `-refit`): the same entry
points as `python -m export.build`, `runtime.serve`, `runtime.client`, `runtime.generate`, `benchmarks.run`,
`export.refit`."""
import storymaker_serve  # noqa: F401  (puts runtime/, export/, ... on sys.path)


def build() -> int:
    from export.build import main

    return main()


def serve() -> int:
    from runtime.serving.launcher import main

    return main()


def client() -> int:
    from runtime.serving.client import main

    return main()


def generate() -> int:
    from runtime.generate import main

    return main()


def bench() -> int:
    from benchmarks.run import main

    main()
    return 0


def refit() -> int:
    from export.refit import main

    return main()
