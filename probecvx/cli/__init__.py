"""The ``probecvx`` command line: one thin module per command over the library.

Each command module defines a click command and is registered below. Library
errors (:class:`probecvx.errors.ProbecvxError`) become a one-line message on
stderr and the error's exit code: 2 for bad usage, 1 for a failed run. An
interrupt (Ctrl-C, SIGINT) exits 130, the shell convention for a process
stopped by SIGINT, with a one-line message and no traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from probecvx import __version__
from probecvx.errors import ProbecvxError

#: Exit status after Ctrl-C: 128 + SIGINT (2), as shells report it.
INTERRUPTED_EXIT_CODE = 130
INTERRUPTED_MESSAGE = (
    "Interrupted; finished files are kept, so run the same command again to continue."
)


class _Group(click.Group):
    """A click group that turns library errors and Ctrl-C into exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ProbecvxError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            # Click would print "Aborted!" and exit 1. The library removes its
            # temporary files and claims while the interrupt unwinds the stack.
            click.echo(INTERRUPTED_MESSAGE, err=True)
            ctx.exit(INTERRUPTED_EXIT_CODE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="probecvx")
@click.option(
    "-v", "--verbose", count=True, help="Log more to stderr (-v info, -vv debug)."
)
def main(verbose: int) -> None:
    """Fit linear classifier probes to every layer of a model at every checkpoint."""
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# Command registrations, one line per command module.
from probecvx.cli import (  # noqa: E402
    demo,  # noqa: F401  (registers `probecvx demo`)
    extract,  # noqa: F401  (registers `probecvx extract`)
    fit,  # noqa: F401  (registers `probecvx fit`)
    layers,  # noqa: F401  (registers `probecvx layers`)
    report,  # noqa: F401  (registers `probecvx report`)
    status,  # noqa: F401  (registers `probecvx status`)
)
