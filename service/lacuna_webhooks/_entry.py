"""The ``lacuna-webhooks`` console script's entry point (pyproject ``[project.scripts]``),
and ``python -m lacuna_webhooks``'s.

It imports the command line inside a ``try``: a Ctrl-C in the first moments of a command,
while the modules are still being imported (``cli`` and what it needs take a fraction of a
second), was a KeyboardInterrupt traceback of twenty lines. It is ``lacuna-webhooks:
interrupted`` and exit code 130 instead, as a Ctrl-C at any later moment. The package's
``__init__`` imports nothing (its names are loaded when first used), so that nothing of ours
runs before this ``try`` but ``sys``.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: every import before the `try` below widens the window
if TYPE_CHECKING:
    from collections.abc import Callable


def _load() -> Callable[[], int] | None:
    """``cli.main``, imported with a Ctrl-C held back until the import is done (``None``
    when one came). A KeyboardInterrupt raised inside a compiled module's initialisation
    (orjson's, measured) crashed the interpreter (SIGSEGV) instead of unwinding it."""
    import signal

    held: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not when SIGINT is ignored (`cmd &`)
        signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        from .cli import main as cli_main
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)
    return None if held else cli_main


def _interrupted() -> int:
    # Imported only now: each module imported before the `try` below widens the window.
    import contextlib
    import signal

    # A second Ctrl-C while the line is written ends nothing more: it is already ending.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, ValueError):  # stderr is gone: nowhere left to say it
        print("lacuna-webhooks: interrupted", file=sys.stderr)
    return 130


def main() -> int:
    """Run the command ``sys.argv`` names; its exit code (130 for a Ctrl-C while loading)."""
    try:
        cli_main = _load()
    except KeyboardInterrupt:
        return _interrupted()
    if cli_main is None:
        return _interrupted()
    try:
        return cli_main()
    except KeyboardInterrupt:
        # The command's own handling covers its run; this, the moments around it (the
        # parser being built, the last flush).
        return _interrupted()


if __name__ == "__main__":
    raise SystemExit(main())
