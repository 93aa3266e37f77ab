"""Command line: parse, call one library function, print. Errors users cause exit non-zero."""

from __future__ import annotations

import functools
import sys

import click
from rich.console import Console

from .errors import LrexportError

out = Console()
err = Console(stderr=True)


def reports_errors(fn):
    """Turn an LrexportError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LrexportError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(e.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lrexport")
def main():
    """Learn low-rank CNNs (SVD training, energy pruning, finetuning) and deploy them."""


@main.command()
def models():
    """List the model names a recipe can use."""
    from .models import list_models

    for name in list_models():
        out.print(name, highlight=False)


if __name__ == "__main__":
    main()
