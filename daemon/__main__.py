"""``python -m daemon`` = ``tickcast serve``: the same parser, checks and exit codes."""

import sys

from daemon.cli import main

raise SystemExit(main(["serve", *sys.argv[1:]]))
