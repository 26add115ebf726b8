"""A plugin that fails while ``serve`` (or ``worker``, or ``handlers``) builds it, run as a real
``serve`` process: whatever it raises, at import or in its factory, ``serve`` stops with exit
code 2 and one ``configuration:`` line naming it, never a traceback and never exit code 0.

``SystemExit(0)`` there used to end ``serve`` silently with 0 (the shipped systemd unit does
not restart on 0), ``sys.exit(3)`` with 3, a ``RuntimeError`` at import with a traceback, a
``BaseException`` subclass with a traceback. A ``KeyboardInterrupt`` is left alone: it is
what a real Ctrl-C during the start raises, and it stops the start as one (exit code 130).
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import TEST_SECRET
from tests.e2e.conftest import CLI, REPO, free_port

pytestmark = pytest.mark.e2e

PLUGINS = textwrap.dedent(
    """
    import os

    class Factory:
        name = "evil"
        events = None

        def __init__(self, ctx):
            kind = os.environ["EVIL"]
            if kind == "exit0":
                raise SystemExit(0)
            if kind == "exit3":
                raise SystemExit(3)
            if kind == "base":
                class Boom(BaseException):
                    pass
                raise Boom("boom")

        async def handle(self, event):
            return None

        async def aclose(self):
            return None
    """
)


def run_serve(tmp_path: Path, handlers: str, evil: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "evil_factory.py").write_text(PLUGINS)
    (tmp_path / "evil_import_exit.py").write_text("raise SystemExit(0)\n")
    (tmp_path / "evil_import_bug.py").write_text("raise RuntimeError('a bug at import')\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "PORT": str(free_port()),
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'start.db'}",
        "LACUNA_HANDLERS": handlers,
        "EVIL": evil,
    }
    return subprocess.run(
        [CLI, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("handlers", "evil", "says"),
    [
        ("evil_factory:Factory", "exit0", "failed to start: SystemExit: 0"),
        ("evil_factory:Factory", "exit3", "failed to start: SystemExit: 3"),
        ("evil_factory:Factory", "base", "failed to start: Boom: boom"),
        ("evil_import_exit:Handler", "", "cannot be loaded: SystemExit: 0"),
        ("evil_import_bug:Handler", "", "cannot be loaded: RuntimeError: a bug at import"),
    ],
)
def test_a_plugin_failing_at_start_is_exit_2_and_one_line(
    tmp_path: Path, handlers: str, evil: str, says: str
) -> None:
    done = run_serve(tmp_path, f"log,{handlers}", evil)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "configuration:" in line]
    assert says in line
    assert not (tmp_path / "start.db").exists()  # stopped before opening the store
