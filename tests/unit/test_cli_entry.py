"""The console script's entry point (``lacuna_webhooks._entry``): a Ctrl-C while the modules
are still being imported is one line and exit 130, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "lacuna-webhooks"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_the_console_script_is_the_entry_module() -> None:
    """pyproject's [project.scripts] names `_entry:main` (reinstall after changing it)."""
    if not SCRIPT.exists():
        pytest.skip("the console script is not installed here")
    assert "lacuna_webhooks._entry import main" in SCRIPT.read_text()


def test_importing_the_package_imports_nothing_of_ours() -> None:
    """`import lacuna_webhooks` (what the console script does first, outside any `try`)
    loads no module of the package; its public names still load when used."""
    code = (
        "import sys, lacuna_webhooks\n"
        "ours = sorted(m for m in sys.modules if m.startswith('lacuna_webhooks.'))\n"
        "assert ours == [], ours\n"
        "from lacuna_webhooks import Handler, construct_event, parse_event\n"
        "assert lacuna_webhooks.verify is not None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_ctrl_c_while_the_command_loads_is_one_line_and_130(tmp_path: Path) -> None:
    """SIGINT at 0.1 to 0.5 s, while `serve`'s modules are imported (or once it runs): it
    printed a KeyboardInterrupt traceback of twenty lines (and a SIGINT inside orjson's
    initialisation crashed the interpreter). Several delays, as the moment that matters
    depends on the machine's speed; none may show a traceback."""
    if not SCRIPT.exists():
        pytest.skip("the console script is not installed here")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "LACUNA_WEBHOOK_SECRET": SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'entry.db'}",
        "HOST": "127.0.0.1",
        "PORT": "9431",
        "PYTHONFAULTHANDLER": "1",
    }
    # As the tester ran it: SIGINT at its default (a shell's `cmd &` would ignore it).
    launcher = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    interrupted = 0
    for delay in (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5):
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, str(SCRIPT), "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err_bytes = proc.communicate(timeout=60)
        err = err_bytes.decode(errors="replace")
        if proc.returncode == -signal.SIGINT or "init_import_site" in err:
            # Ended before Python's own start was done (a slow machine): nothing of ours ran.
            continue
        assert "Traceback" not in err, (delay, err)
        assert "Fatal Python error" not in err, (delay, err)
        assert proc.returncode == 130, (delay, proc.returncode, err)
        assert err.rstrip().endswith("lacuna-webhooks: interrupted"), (delay, err)
        interrupted += 1
    assert interrupted, "every SIGINT came before Python had started"


def test_ctrl_c_before_the_loop_runs_its_coroutine_is_still_one_line(tmp_path: Path) -> None:
    """The moment test_ctrl_c_while_the_command_loads_is_one_line_and_130 hit now and then
    (CI, at 0.4 s): a Ctrl-C while `serve`'s event loop was being made, after its main
    coroutine was created. Python then logged a "coroutine ... was never awaited"
    RuntimeWarning after the "interrupted" line. Made certain here: the runner raises
    KeyboardInterrupt without starting the coroutine."""
    code = (
        "import asyncio, os, sys\n"
        "def interrupted(self, coro, *, context=None):\n"
        "    raise KeyboardInterrupt\n"
        "asyncio.Runner.run = interrupted\n"
        "from lacuna_webhooks.cli import main\n"
        "status = main(['serve'], dict(os.environ))\n"
        "import gc; gc.collect()\n"
        "sys.exit(status)\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "LACUNA_WEBHOOK_SECRET": SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'entry.db'}",
        "LACUNA_LOG_FORMAT": "json",
        "HOST": "127.0.0.1",
        "PORT": "9432",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.rstrip().endswith("lacuna-webhooks: interrupted"), done.stderr
    assert "never awaited" not in done.stderr
