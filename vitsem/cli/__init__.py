"""The ``vitsem`` command line: ``app`` (groups and error mapping), ``local`` (library on this
machine: data, train, sift, analyze), ``platform`` (flows and services: audit, pretrain, serve,
demo, db, settings), ``review`` (review decisions), ``registry`` (registered models:
register, compare, promote, hold), ``console`` (tables and progress)."""

from vitsem.cli import local, platform, registry, review  # noqa: F401  (registers the commands)
from vitsem.cli.app import app

__all__ = ["app"]
