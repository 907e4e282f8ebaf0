"""The ``vitsem`` application: command groups, defaults for the embedded services and one
mapping from every error vitsem raises on purpose (or a refused option value) to a one-line
message and exit code 2."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.markup import escape

from vitsem.cli.console import console
from vitsem.errors import VitsemError

app = typer.Typer(help="Explain and audit Vision Transformers through SIFT keypoints.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="The shipped shortcut benchmark.", no_args_is_help=True)
app.add_typer(data_app, name="data")
db_app = typer.Typer(help="The metadata database.", no_args_is_help=True)
app.add_typer(db_app, name="db")

F = TypeVar("F", bound=Callable[..., Any])


def home() -> Path:
    return Path(os.environ.get("VITSEM_HOME", "vitsem-work"))


def error_message(e: Exception) -> str:
    """One line for a refused input: the error's own message, or each invalid field of a
    parameter model with what was wrong."""
    if isinstance(e, ValidationError):
        parts = [f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
                 for err in e.errors()]
        return f"invalid {e.title}: " + "; ".join(parts)
    return " ".join(str(e).split())


def command(group: typer.Typer = app, name: str | None = None) -> Callable[[F], F]:
    """Register a command whose vitsem errors and invalid options end in one line on the
    console and exit code 2, never a traceback."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (VitsemError, ValidationError) as e:
                console.print(f"[bold red]error:[/] {escape(error_message(e))}")
                raise typer.Exit(code=2) from e

        group.command(name)(run)
        return fn

    return register
