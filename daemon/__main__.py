"""``python -m daemon`` = ``tickcast serve``."""

import sys

from daemon.cli import main

raise SystemExit(main(["serve", *sys.argv[1:]]))
