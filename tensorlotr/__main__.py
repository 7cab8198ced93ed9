"""``python -m tensorlotr``: the command line, as the ``tensorlotr`` script runs it."""

from .cli import main

raise SystemExit(main())
