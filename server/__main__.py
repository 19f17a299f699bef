"""`python -m sparse_serve.server ...` is `sparse-serve ...`."""
import os
import sys

# NOTE: `python -m` puts the current directory first on sys.path. From the repository root that
# directory holds folders named like PyPI packages (kernels/, which transformers imports); drop
# it before anything else is imported, as `python -P` would.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.getcwd():
    del sys.path[0]

from sparse_serve.server.cli import main  # noqa: E402

raise SystemExit(main())
