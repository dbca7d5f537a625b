"""storymaker-serve as an installed distribution.

The checkout keeps its top-level layout (`runtime/`, `export/`, `kernels/`, `benchmarks/`, `triton_repo/`;
`python -m export.build` works from it). Installed, those folders live *inside* this package
(site-packages/storymaker_serve/runtime, ...), so installing never writes a top-level `kernels/` or
`runtime/` that another distribution owns (there is a popular `kernels` package on PyPI). Importing
`storymaker_serve` puts the folder that holds them first on `sys.path` (installed: this package's folder; in
a checkout: the repository root), so in this process `import runtime` means ours. The console scripts
(storymaker_serve/cli.py) and the Triton model glue import this first.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
ROOT = _HERE if (_HERE / "runtime").is_dir() else _HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__version__ = "0.2.0"
