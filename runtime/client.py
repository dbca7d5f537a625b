"""`python -m runtime.client`: command line of the gRPC story client (runtime/serving/client.py)."""
import sys

from runtime.serving.client import main

if __name__ == "__main__":
    sys.exit(main())
