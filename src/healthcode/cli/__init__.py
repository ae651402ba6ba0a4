"""The ``healthcode`` command line: one subcommand per job (evaluate, generate, load, reevaluate, serve, call,
spark)."""

from healthcode.cli.main import main

__all__ = ["main"]
