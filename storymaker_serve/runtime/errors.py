"""Error types that carry a message a user can act on.

`WeightsError` is raised for missing or mismatched weight files (it names the
file, the expected key/shape and the fix); `DeploymentError` for a build that cannot run on this host;
`InputError` for bad request input
(empty mask, size mismatch, too many characters, ...). Servers turn both into a
per-request error; CLIs print them without a traceback.
"""
import sys


class StoryMakerError(Exception):
    """Base class: the message is meant for the user, not for a traceback."""


class WeightsError(StoryMakerError):
    """A weight file or folder is missing, or its keys/shapes do not match."""


class DeploymentError(StoryMakerError):
    """A build cannot run where it was loaded: an execution provider the deployment asks for is missing, or an
    engine was built for another GPU or TensorRT version. Raised at load, never at a request."""


class InputError(StoryMakerError, ValueError):
    """A request's input cannot be processed (and would not be on retry)."""


def cli_exit(fn, *args, catch: tuple = ()) -> int:
    """Run a command-line body: a StoryMakerError (and any of `catch`) becomes 'error: ...' on stderr and exit
    code 2 (bad input: the message names it and the fix); otherwise fn's own exit code."""
    try:
        return fn(*args)
    except (StoryMakerError, *catch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
