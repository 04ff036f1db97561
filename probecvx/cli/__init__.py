"""The ``probecvx`` command line: one thin module per command over the library.

Each command module defines a click command and is registered below. Library
errors (:class:`probecvx.errors.ProbecvxError`) become a one-line message on
stderr and the error's exit code: 2 for bad usage, 1 for a failed run. An
interrupt (Ctrl-C, SIGINT) exits 130 and SIGTERM (``kill PID``, or SLURM at a
time limit or ``scancel``) exits 143, the shell conventions of 128 plus the
signal number. Both unwind the stack, so temporary files and claims are
removed, and print a one-line message without a traceback. Python warnings
are printed as one line, ``Warning: <message>``, without the file and line
that raised them.

Log records go to stderr. By default only warnings and errors are shown, in
the same one-line form, ``Warning: <message>`` or ``Error: <message>``.
``-v``/``--verbose`` is accepted before the command name and after it, and the
counts add up: ``probecvx -v fit ... -v`` logs at debug level. Under ``-v``
every record gets a timestamp, its level and its logger's name.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO, TypeVar

import click

from probecvx import __version__
from probecvx.errors import INTERRUPTED_EXIT_CODE, ProbecvxError

INTERRUPTED_MESSAGE = (
    "Interrupted; finished files are kept, so run the same command again to continue."
)
#: Exit status after SIGTERM: 128 + SIGTERM (15), as shells report it.
TERMINATED_EXIT_CODE = 143
TERMINATED_MESSAGE = (
    "Terminated; finished files are kept, so run the same command again to continue."
)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so the stack unwinds as for Ctrl-C.

    It derives from BaseException, like KeyboardInterrupt, so that handlers of
    Exception let it pass, while the library's cleanup (``except
    BaseException``, ``finally``) and joblib's abort of its workers still run.
    """


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM while the first unwinds would cut the cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


#: Seconds to wait before sending a dropped interrupt again. It is meant to
#: let the code that dropped it, and the hook itself, return first.
REDELIVERY_DELAY = 0.01


class _RedeliverStop:
    """Raise an interrupt again that Python had to drop, instead of printing it.

    A signal's exception is raised wherever the main thread is. When that is a
    weakref callback or a ``__del__`` method, for instance during a garbage
    collection inside joblib, Python cannot propagate it, so it prints
    "Exception ignored in ..." with a traceback and goes on.

    Installed as :data:`sys.unraisablehook` while a command runs, this sends
    the signal to the main thread again from a timer thread, so that it is
    raised where it can unwind the stack. A signal sent from the hook itself
    would be raised inside the hook and dropped again. Other unraisable
    exceptions go to the hook installed before.
    """

    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous
        self.timers: list[threading.Timer] = []

    def __call__(self, unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._send_later(signal.SIGINT)
        elif isinstance(unraisable.exc_value, Terminated):
            # The first SIGTERM set the handler to ignore further ones.
            signal.signal(signal.SIGTERM, _raise_terminated)
            self._send_later(signal.SIGTERM)
        else:
            self.previous(unraisable)

    def cancel(self) -> None:
        """Cancel the sends still pending, because the command has ended."""
        for timer in self.timers:
            timer.cancel()

    def _send_later(self, signum: int) -> None:
        main_thread = threading.main_thread().ident
        assert main_thread is not None
        timer = threading.Timer(
            REDELIVERY_DELAY, signal.pthread_kill, args=(main_thread, signum)
        )
        timer.daemon = True
        self.timers.append(timer)
        timer.start()


VERBOSE_HELP = "Log more to stderr (-v info, -vv debug)."
_VERBOSE_KEY = "probecvx.verbose"

_Command = TypeVar("_Command", bound=Callable[..., Any])


#: Log format under -v: timestamps help to follow a long run.
VERBOSE_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PlainFormatter(logging.Formatter):
    """Format a record as ``Warning: <message>`` or ``Error: <message>``.

    This matches the form of Python warnings and of the command's own errors.
    A traceback attached to the record still follows it.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.capitalize()}: {record.getMessage()}"


_log_handler: logging.Handler | None = None


def _configure_logging(verbose: int) -> None:
    """Set the root logger's level and the stderr handler's format for ``verbose``."""
    logging.getLogger().setLevel(_log_level(verbose))
    if _log_handler is not None:
        if verbose:
            _log_handler.setFormatter(logging.Formatter(VERBOSE_LOG_FORMAT))
        else:
            _log_handler.setFormatter(PlainFormatter())


def _install_log_handler() -> logging.Handler:
    """Add a handler that writes log records to the current stderr."""
    global _log_handler
    # The stream is read now, because the tests swap sys.stderr per invocation.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PlainFormatter())
    logging.getLogger().addHandler(handler)
    _log_handler = handler
    return handler


def _remove_log_handler(handler: logging.Handler) -> None:
    global _log_handler
    logging.getLogger().removeHandler(handler)
    if _log_handler is handler:
        _log_handler = None


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Print a warning as one line on stderr, without the code that raised it.

    It replaces :func:`warnings.showwarning` while a command runs. The category
    is shown unless it is a plain UserWarning, because a name such as
    DeprecationWarning or ConvergenceWarning identifies the kind of problem.
    """
    text = " ".join(str(message).split())
    if category is not UserWarning:
        text = f"{category.__name__}: {text}"
    click.echo(f"Warning: {text}", err=True)


class _Group(click.Group):
    """A click group that turns library errors, Ctrl-C and SIGTERM into exit codes.

    While a command runs, warnings are printed by :func:`show_warning`,
    SIGTERM raises :class:`Terminated` in the main thread, and an interrupt
    that Python dropped is sent again by :class:`_RedeliverStop`.
    """

    def invoke(self, ctx: click.Context) -> Any:
        # Signal handlers can only be set from the main thread.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.getsignal(signal.SIGTERM)
        if in_main_thread:
            signal.signal(signal.SIGTERM, _raise_terminated)
        previous_unraisablehook = sys.unraisablehook
        redeliver = _RedeliverStop(previous_unraisablehook)
        sys.unraisablehook = redeliver
        log_handler = _install_log_handler()
        try:
            # catch_warnings restores the previous showwarning afterwards, which
            # matters when the group is invoked in-process, as in the tests.
            with warnings.catch_warnings():
                warnings.showwarning = show_warning
                return super().invoke(ctx)
        except ProbecvxError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            # Click would print "Aborted!" and exit 1. The library removes its
            # temporary files and claims while the interrupt unwinds the stack.
            click.echo(INTERRUPTED_MESSAGE, err=True)
            ctx.exit(INTERRUPTED_EXIT_CODE)
        except Terminated:
            click.echo(TERMINATED_MESSAGE, err=True)
            ctx.exit(TERMINATED_EXIT_CODE)
        finally:
            redeliver.cancel()
            sys.unraisablehook = previous_unraisablehook
            _remove_log_handler(log_handler)
            if in_main_thread:
                # getsignal returns None for a handler not set from Python.
                if previous_handler is None:
                    previous_handler = signal.SIG_DFL
                signal.signal(signal.SIGTERM, previous_handler)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="probecvx")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Fit linear classifier probes to every layer of a model at every checkpoint."""
    ctx.meta[_VERBOSE_KEY] = verbose
    _configure_logging(verbose)


def check_jobs(ctx: click.Context, param: click.Parameter, n_jobs: int) -> int:
    """Reject ``--jobs 0``; joblib reads -1 as every core and -2 as all but one."""
    if n_jobs == 0:
        raise click.BadParameter(
            "0 workers cannot fit anything; give a positive number of workers, "
            "or -1 for one per core"
        )
    return n_jobs


def check_tol(
    ctx: click.Context, param: click.Parameter, tol: float | None
) -> float | None:
    """Reject a ``--tol`` that is not a positive finite number."""
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise click.BadParameter(
            f"{tol} is not a positive number; give a tolerance such as 1e-4, or "
            "leave --tol out to use the solver's own"
        )
    return tol


def verbose_option(command: _Command) -> _Command:
    """Add ``-v``/``--verbose`` to a subcommand, counted on top of the group's."""
    return click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_raise_verbosity,
        help=VERBOSE_HELP,
    )(command)


def _raise_verbosity(ctx: click.Context, param: click.Parameter, count: int) -> None:
    if count:
        total = ctx.meta.get(_VERBOSE_KEY, 0) + count
        ctx.meta[_VERBOSE_KEY] = total
        _configure_logging(total)


def _log_level(verbose: int) -> int:
    if verbose >= 2:
        return logging.DEBUG
    if verbose == 1:
        return logging.INFO
    return logging.WARNING


# Command registrations, one line per command module.
from probecvx.cli import (  # noqa: E402
    demo,  # noqa: F401  (registers `probecvx demo`)
    extract,  # noqa: F401  (registers `probecvx extract`)
    fit,  # noqa: F401  (registers `probecvx fit`)
    layers,  # noqa: F401  (registers `probecvx layers`)
    report,  # noqa: F401  (registers `probecvx report`)
    status,  # noqa: F401  (registers `probecvx status`)
)
