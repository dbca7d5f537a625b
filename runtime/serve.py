"""`python -m runtime.serve`: command line of the Triton launcher (runtime/serving/launcher.py)."""
import sys

from runtime.serving.launcher import main

if __name__ == "__main__":
    sys.exit(main())
