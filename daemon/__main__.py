"""``python -m daemon`` = ``tickcast serve``."""

import argparse

from daemon.cli import add_settings_arguments, run_serve

parser = argparse.ArgumentParser(prog="python -m daemon", description="run the streaming daemon")
add_settings_arguments(parser)
raise SystemExit(run_serve(parser.parse_args()))
