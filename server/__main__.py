"""`python -m server ...` is `sparse-serve ...`."""
from server.cli import main

raise SystemExit(main())
