"""``python -m scoped_parallel``: see :mod:`scoped_parallel._cli`."""

from scoped_parallel._cli import main

raise SystemExit(main())
