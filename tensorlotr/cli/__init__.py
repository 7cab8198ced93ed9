"""The ``tensorlotr`` command: argument parsing and printing over the jobs (:mod:`tensorlotr.jobs`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
