"""The ``vitsem`` command line."""

from vitsem.cli.app import app

__all__ = ["app"]
