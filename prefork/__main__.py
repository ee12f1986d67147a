"""``python -m prefork``: the same as the ``prefork`` command."""

from prefork.cli import main

raise SystemExit(main())
