"""The Python-backend glue of the served models, one file per model.

`export.triton_repo` copies `NAME.py` to `BUILD/triton_repo/NAME/1/model.py` (and to the NGC repository);
tritonserver's Python-backend stub loads it from there. These files import `triton_python_backend_utils`,
which exists only inside the stub, so they are never imported as modules of this package.
"""
