"""``python -m daemon.bench CONFIG``: one child daemon of a bench run (see :mod:`.child`)."""

import sys

from daemon.bench.child import child_main

raise SystemExit(child_main(sys.argv[1]))
