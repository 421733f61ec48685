"""``python -m scoped_parallel``: see :mod:`scoped_parallel.layout.cli`."""

from scoped_parallel.layout.cli import main

raise SystemExit(main())
