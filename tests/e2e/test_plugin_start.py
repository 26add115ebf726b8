"""A plugin that fails while ``serve`` (or ``worker``, or ``handlers``) builds it, run as a real
``serve`` process: whatever it raises, at import or in its factory, ``serve`` stops with exit
code 2 and one ``configuration:`` line naming it, never a traceback and never exit code 0.

``SystemExit(0)`` there used to end ``serve`` silently with 0 (the shipped systemd unit does
not restart on 0), ``sys.exit(3)`` with 3, a ``RuntimeError`` at import with a traceback, a
``BaseException`` subclass with a traceback. A ``KeyboardInterrupt`` is left alone: it is
what a real Ctrl-C during the start raises, and it stops the start as one (exit code 130).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_SECRET, make_event, signed
from tests.e2e.conftest import CLI, REPO, Serve, free_port, wait_until

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
            if kind == "hard0":
                os._exit(0)
            if kind == "interrupt":
                raise KeyboardInterrupt
            if kind == "base":
                class Boom(BaseException):
                    pass
                raise Boom("boom")
            if kind == "unprintable":
                class Unprintable(Exception):
                    def __str__(self):
                        raise RuntimeError("__str__ exploded")
                raise Unprintable()
            if kind == "metaname":
                class Nameless(type):
                    @property
                    def __name__(cls):
                        raise RuntimeError("no name")
                class Named(Exception, metaclass=Nameless):
                    pass
                raise Named("named all the same")
            if kind == "huge":
                raise ValueError("Z" * 50_000_000 + os.environ["LACUNA_WEBHOOK_SECRET"])
            if kind in ("hugeconfig", "noproblem"):
                from lacuna_webhooks import ConfigError
                if kind == "noproblem":
                    raise ConfigError([])
                secret = os.environ["LACUNA_WEBHOOK_SECRET"]
                raise ConfigError(["LACUNA_EVIL_MODE " + "Z" * 20_000_000 + secret] * 50)
            if kind == "events":
                self.events = [1] * 5_000_000
            if kind == "manyevents":
                self.events = frozenset(f"type.{i:07d}.{'x' * 40}" for i in range(400_000))

        async def handle(self, event):
            return None

        async def aclose(self):
            return None

    class ImportErrorUnprintable(ImportError):
        def __str__(self):
            raise RuntimeError("__str__ exploded")

    class ExitingName(type):
        @property
        def name(cls):
            raise SystemExit(0)

    class NameExits(Factory, metaclass=ExitingName):
        pass

    class BadEvents(Factory):
        events = 5

    class RaisingEvents(type):
        @property
        def events(cls):
            from lacuna_webhooks import ConfigError
            raise ConfigError("LACUNA_EVIL_EVENTS " + "Z" * 20_000_000)

    class HugeEvents(Factory, metaclass=RaisingEvents):
        pass
    """
)


def run_serve(tmp_path: Path, handlers: str, evil: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "evil_factory.py").write_text(PLUGINS)
    (tmp_path / "evil_import_exit.py").write_text("raise SystemExit(0)\n")
    (tmp_path / "evil_import_bug.py").write_text("raise RuntimeError('a bug at import')\n")
    (tmp_path / "evil_import_hard.py").write_text("import os\nos._exit(0)\n")
    (tmp_path / "evil_import_unprintable.py").write_text(
        "from evil_factory import ImportErrorUnprintable\nraise ImportErrorUnprintable()\n"
    )
    (tmp_path / "evil_import_interrupt.py").write_text("raise KeyboardInterrupt\n")
    (tmp_path / "evil_import_kill.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
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
        # A KeyboardInterrupt the plugin raises itself (no Ctrl-C reaches the process that
        # checks it) was a traceback and "killed by signal SIGINT".
        (
            "evil_factory:Factory",
            "interrupt",
            "'evil_factory:Factory' handler failed to start: Key",
        ),
        (
            "evil_import_interrupt:Handler",
            "",
            "the 'evil_import_interrupt:Handler' handler failed to start: KeyboardInterrupt",
        ),
        # What a plugin raised, described without trusting its class (a __str__ or a
        # metaclass's __name__ that raised printed a traceback and was reported as the
        # plugin ending its process), cut short (a 50 MB message was reported as a garbled
        # answer), its secrets masked.
        (
            "evil_factory:Factory",
            "unprintable",
            "failed to start: Unprintable: (its message could not be read)",
        ),
        ("evil_factory:Factory", "metaname", "failed to start: Named: named all the same"),
        ("evil_factory:Factory", "huge", "failed to start: ValueError: ZZZZ"),
        # Its own ConfigError too: 50 lines of 20 MB were reported as the plugin writing to
        # its socket (10 MB printed whole); none at all left it out of a serve that started.
        ("evil_factory:Factory", "hugeconfig", "configuration: LACUNA_EVIL_MODE ZZZZ"),
        (
            "evil_factory:Factory",
            "noproblem",
            "the 'evil_factory:Factory' handler failed to start: ConfigError: (its message",
        ),
        ("evil_factory:Factory", "events", "events must be None or a set of event type"),
        # An answer over the check's 16 MiB frame was blamed on the plugin writing to its
        # socket.
        ("evil_factory:Factory", "manyevents", "subscribes to 400000 event types, too many"),
        ("evil_import_unprintable:Handler", "", "cannot be loaded: (its message could not"),
        # Its `name` is its code too: SystemExit(0) there was reported as the plugin ending
        # its process.
        ("evil_factory:NameExits", "", "'evil_factory:NameExits', which cannot be loaded: Sys"),
        ("evil_import_exit:Handler", "", "cannot be loaded: SystemExit: 0"),
        ("evil_import_bug:Handler", "", "cannot be loaded: RuntimeError: a bug at import"),
        # Hard exits, which no `except` sees: serve exited 0 without a word (os._exit(0) at
        # import), or died with the plugin. Now the plugin's code runs in a child process.
        (
            "evil_import_hard:Handler",
            "",
            "the 'evil_import_hard:Handler' handler ended the process that checks it "
            "(exited with code 0 while it was imported or built)",
        ),
        (
            "evil_factory:Factory",
            "hard0",
            "the 'evil_factory:Factory' handler ended the process that checks it "
            "(exited with code 0",
        ),
        (
            "evil_import_kill:Handler",
            "",
            "handler ended the process that checks it (was killed by signal SIGKILL",
        ),
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
    assert len(line) < (20_000 if evil == "hugeconfig" else 1000)
    assert TEST_SECRET not in done.stderr
    assert not (tmp_path / "start.db").exists()  # stopped before opening the store


NOTED = textwrap.dedent(
    """
    import os
    from pathlib import Path

    def note(what):
        with Path(os.environ["NOTED_PATH"]).open("a") as fh:
            fh.write(f"{what} {os.getpid()}\\n")

    note("import")

    class Noted:
        name = "noted"
        events = None

        def __init__(self, ctx):
            note("build")

        async def handle(self, event):
            note("handle")

        async def aclose(self):
            return None
    """
)


def test_a_plugins_code_never_runs_in_the_serve_process(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """serve imported and built every plugin in its own process at start, to check it: a
    thread the plugin started at import stayed there beside intake (one spinning on the CPU
    made each webhook about 3.4 times slower), and its hard exit was serve's. Its import,
    its factory and its handle() now run only in child processes."""
    (tmp_path / "noted_plugin.py").write_text(NOTED)
    noted = tmp_path / "noted.txt"
    serve = serve_factory(
        {
            "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'noted.db'}",
            "LACUNA_HANDLERS": "log,noted_plugin:Noted",
            "NOTED_PATH": str(noted),
        }
    ).start()
    body, headers = signed(make_event("evt_noted_1"))
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200
    wait_until(lambda: "handle" in noted.read_text(), what="the delivery")
    steps = [line.split() for line in noted.read_text().splitlines()]
    assert {what for what, _ in steps} == {"import", "build", "handle"}
    assert serve.proc is not None
    assert str(serve.proc.pid) not in {pid for _, pid in steps}, steps


@pytest.mark.parametrize("command", [["handlers"], ["retry-dead"], ["handlers", "pause", "log"]])
def test_a_plugin_exiting_at_import_fails_the_cli_commands_too(
    tmp_path: Path, command: list[str]
) -> None:
    """The CLI commands that name or filter the configured handlers loaded each plugin in
    their own process: `os._exit(0)` at import ended `handlers` or `retry-dead` with exit
    code 0 and half its output. They load it in the check process too: exit 2, one line."""
    (tmp_path / "evil_import_hard.py").write_text("import os\nos._exit(0)\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "LACUNA_HANDLERS": "log,evil_import_hard:Handler",
    }
    done = subprocess.run(
        [CLI, *command], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert (
        "the 'evil_import_hard:Handler' handler ended the process that checks it"
        in done.stdout + done.stderr
    )


@pytest.mark.parametrize("command", [["retry-dead"], ["handlers", "pause", "log"]])
@pytest.mark.parametrize(
    ("handler", "says"),
    [
        ("evil_factory:BadEvents", "handler's events must be None or a set of event type"),
        ("evil_factory:NameExits", "'evil_factory:NameExits', which cannot be loaded: SystemExit"),
        ("evil_factory:HugeEvents", "configuration: LACUNA_EVIL_EVENTS ZZZZ"),
    ],
)
def test_a_plugins_bad_name_or_events_fail_the_cli_commands_with_one_line(
    tmp_path: Path, command: list[str], handler: str, says: str
) -> None:
    """The commands that name or filter handlers read each plugin's `name` and `events`
    without building it: `events = 5` raised there, outside the plugin boundary, a traceback
    (logged by the check process) and "the plugin ended the process that checks it"; a
    `name` raising SystemExit(0), the same with exit code 0."""
    (tmp_path / "evil_factory.py").write_text(PLUGINS)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "LACUNA_HANDLERS": f"log,{handler}",
        "EVIL": "",
    }
    done = subprocess.run(
        [CLI, *command], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert says in line
    assert len(line) < 1000


FORGER = textwrap.dedent(
    """
    # At import in the process that checks it, this plugin writes an answer of its own to
    # that process's socket to serve, before the real one: the settings FORGE names.
    import os, re
    from pathlib import Path

    import orjson

    command = Path("/proc/self/cmdline").read_bytes()
    if b"plugin_check" in command:
        fd = int(re.search(rb"child_main\\((\\d+)\\)", command)[1])
        name, item = "forger", "forger_plugin:Forger"
        answer = {
            "names": [name], "filters": {name: None}, "timeouts": {name: 5.0},
            "items": {name: item}, "kinds": {name: item}, "concurrency": {name: 4},
            "policies": {name: [2, 0.2, 1.0]}, "after": {},
        }
        if os.environ["FORGE"] == "settings":
            answer["timeouts"] = {name: 1e308}
            answer["concurrency"] = {name: 10**18}
            answer["policies"] = {name: [10**18, 1e308, -1]}
            answer["after"] = {name: [name]}
        elif os.environ["FORGE"] == "problems":
            answer = ["\x1b]0;pwned\x07" + "p" * 5_000_000] + ["\x1b[2J" + "q" * 100] * 50_000
        elif os.environ["FORGE"] == "ghost":
            answer["names"].append("ghost")
            answer["items"]["ghost"] = "os:system"
            answer["filters"]["ghost"] = None
        data = orjson.dumps(["problems" if os.environ["FORGE"] == "problems" else "answer", answer])
        os.write(fd, len(data).to_bytes(4, "big") + data)

    class Forger:
        name = "forger"
        events = None

        def __init__(self, ctx):
            pass

        async def handle(self, event):
            with Path(os.environ["FORGER_PATH"]).open("a") as fh:
                fh.write(event.id + "\\n")

        async def aclose(self):
            return None
    """
)


def test_a_forged_check_answer_sets_none_of_the_services_settings(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A plugin that, at import in the process that checks it, forges that process's answer
    with the service's own settings (a timeout of 1e308: every claim failed, for every
    handler, with a traceback each time; an AFTER cycle): they are read again from the
    environment, and events are delivered as configured."""
    (tmp_path / "forger_plugin.py").write_text(FORGER)
    out = tmp_path / "forged.txt"
    serve = serve_factory(
        {
            "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'forged.db'}",
            "LACUNA_HANDLERS": "forger_plugin:Forger",
            "FORGE": "settings",
            "FORGER_PATH": str(out),
        }
    ).start()
    body, headers = signed(make_event("evt_forged_1"))
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200
    wait_until(lambda: out.exists() and "evt_forged_1" in out.read_text(), what="the delivery")
    assert "claim_failed" not in serve.log()
    assert "Traceback" not in serve.log()


def test_a_forged_check_answer_naming_other_handlers_stops_the_start(tmp_path: Path) -> None:
    """A forged answer naming a handler LACUNA_HANDLERS does not (its worker importing
    ``os:system``): ``serve`` refuses to start with one line, where it started and retried
    that worker forever."""
    (tmp_path / "forger_plugin.py").write_text(FORGER)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "PORT": str(free_port()),
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'ghost.db'}",
        "LACUNA_HANDLERS": "forger_plugin:Forger",
        "FORGE": "ghost",
        "FORGER_PATH": str(tmp_path / "ghost.txt"),
    }
    try:
        done = subprocess.run(
            [CLI, "serve"], env=env, capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("serve started with a forged handler set")
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if "configuration:" in line]
    assert "does not match LACUNA_HANDLERS" in line
    assert "Traceback" not in done.stderr


FORK_AND_EXIT = textwrap.dedent(
    """
    # At import: fork a process that keeps every descriptor (the check's socket among them)
    # and sleeps, then end the process that checks the plugin without an answer.
    import os, time
    from pathlib import Path

    forked = os.fork()
    if forked == 0:
        time.sleep(300)
        os._exit(0)
    Path(os.environ["FORKED_PATH"]).write_text(str(forked))
    os._exit(0)
    """
)


@pytest.mark.parametrize("command", [["serve"], ["handlers", "pause", "log"]])
def test_a_plugin_forking_then_exiting_at_import_does_not_hang_the_start(
    tmp_path: Path, command: list[str]
) -> None:
    """The process a plugin forked at import holds the check's socket: the check process
    exited without an answer, and serve (or a CLI command) waited for an EOF that came only
    when the forked process ended, for ever for one that sleeps. The check's end is its
    process's; the forked one is stopped with it."""
    (tmp_path / "evil_import_fork.py").write_text(FORK_AND_EXIT)
    forked = tmp_path / "forked.txt"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "PORT": str(free_port()),
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'fork.db'}",
        "LACUNA_HANDLERS": "log,evil_import_fork:Handler",
        "FORKED_PATH": str(forked),
    }
    try:
        done = subprocess.run(
            [CLI, *command], env=env, capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        pid = int(forked.read_text())
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{command[0]} waited for the process the plugin forked")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    assert (
        "the 'evil_import_fork:Handler' handler ended the process that checks it "
        "(exited with code 0" in done.stderr
    )
    pid = int(forked.read_text())
    wait_until(lambda: not running(pid), timeout=5, what="the forked process to be stopped")


def running(pid: int) -> bool:
    """Whether the process ``pid`` runs (gone or a zombie: not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


ESCAPE = textwrap.dedent(
    """
    # At import: a process that leaves the check's (or the worker's) process group, beyond
    # the group kill (a double fork, setsid in the grandchild), holding every descriptor its
    # parent had, and sleeping; its pid noted. And a print, with the secret in it.
    import os, time

    print("escaper imported, secret", os.environ["LACUNA_WEBHOOK_SECRET"], flush=True)
    first = os.fork()
    if first == 0:
        if os.fork() == 0:
            os.setsid()
            with open(os.environ["ESCAPED_PATH"], "a") as noted:
                noted.write(f"{os.getpid()}\\n")
            time.sleep(60)
            os._exit(0)
        os._exit(0)
    os.waitpid(first, 0)

    class Handler:
        name = "escaper"
        events = None

        def __init__(self, ctx):
            pass

        async def handle(self, event):
            return None

        async def aclose(self):
            return None
    """
)


def escaped_pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.fixture
def escaped(tmp_path: Path) -> Iterator[Path]:
    """Where the ESCAPE plugin notes its escaped processes' pids; they are killed after the
    test (the service cannot reach them: docs/plugins.md)."""
    path = tmp_path / "escaped.txt"
    yield path
    for pid in escaped_pids(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def escape_env(tmp_path: Path, escaped: Path) -> dict[str, str]:
    (tmp_path / "escaper_plugin.py").write_text(ESCAPE)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'escape.db'}",
        "LACUNA_HANDLERS": "log,escaper_plugin:Handler",
        "LACUNA_LOG_FORMAT": "json",
        "ESCAPED_PATH": str(escaped),
    }


def test_a_process_a_plugin_left_in_a_session_of_its_own_does_not_hold_the_cli_output(
    tmp_path: Path, escaped: Path
) -> None:
    """The process that checks a plugin had the command's own stdout and stderr: one the
    plugin double-forked into a session of its own (setsid: beyond the group kill) kept
    them open, and `lacuna-webhooks handlers 2>&1 | cat`, or anything capturing the output
    through pipes, waited for it (60 s here). Now the check writes into a pipe the command
    relays and stops reading; what the plugin prints still arrives, redacted."""
    env = escape_env(tmp_path, escaped)
    try:
        done = subprocess.run(
            [CLI, "handlers"], env=env, capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("handlers waited for the process the plugin left running")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "escaper" in done.stdout
    pids = escaped_pids(escaped)
    assert pids
    assert any(running(pid) for pid in pids)  # it did escape: still there, sleeping
    assert TEST_SECRET not in done.stdout + done.stderr
    printed = [
        line
        for line in (json.loads(x) for x in done.stderr.splitlines() if x.startswith("{"))
        if line.get("event") == "process.output"
    ]
    assert {(p["handler"], p["stream"], p["line"]) for p in printed} == {
        ("check", "stdout", "escaper imported, secret **********")
    }


def test_a_process_a_plugin_left_in_a_session_of_its_own_does_not_hold_serves_output(
    tmp_path: Path, escaped: Path
) -> None:
    """The same for `serve` under something that reads its output through a pipe (a
    supervisor, `serve 2>&1 | cat`): the plugin's check process, and then its handler's
    worker process, each leave a process in a session of its own; after SIGTERM serve
    exits, and its output ends with it."""
    env = escape_env(tmp_path, escaped)
    proc = subprocess.Popen(
        [CLI, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{env['PORT']}"

        def ready() -> bool:
            assert proc.poll() is None, proc.returncode
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, what="serve to be ready")
        # One left by the check at start, one by the handler's worker process.
        wait_until(lambda: len(escaped_pids(escaped)) >= 2, what="the escaped processes")
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("serve's output stayed open: a process the plugin left holds it")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0, output[-2000:]
    assert all(running(pid) for pid in escaped_pids(escaped))  # still there, still asleep
    log = output.decode(errors="replace")
    assert TEST_SECRET not in log
    handlers = {
        line["handler"]
        for line in (json.loads(x) for x in log.splitlines() if x.startswith("{"))
        if line.get("event") == "process.output"
    }
    assert handlers == {"check", "escaper"}  # the check's and the worker's, relayed


SLOW = textwrap.dedent(
    """
    import os, time

    if os.environ["SLOW"] == "import":
        time.sleep(3600)  # a connection made at import that never answers

    class Slow:
        name = "slow"
        events = None

        def __init__(self, ctx):
            time.sleep(70)  # longer than a worker process may take to start

        async def handle(self, event):
            return None

        async def aclose(self):
            return None
    """
)

#: The real command line, with the check's bound at 3 s (60 s in the shipped code).
QUICK_CHECK = (
    "import sys\n"
    "from lacuna_webhooks import plugin_check\n"
    "plugin_check.CHECK_TIMEOUT_SECONDS = 3.0\n"
    "from lacuna_webhooks.cli import main\n"
    "sys.exit(main())\n"
)


@pytest.mark.parametrize(
    ("command", "slow"),
    [
        (["serve"], "import"),
        (["serve"], "build"),
        (["handlers"], "import"),
        (["handlers"], "build"),
        (["retry-dead"], "import"),
        (["handlers", "pause", "log"], "import"),
        (["replay", "evt_1"], "import"),
        (["backfill", "log", "--all", "--dry-run"], "build"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, list) else value,
)
def test_a_plugin_blocking_at_start_stops_it_with_one_line(
    tmp_path: Path, command: list[str], slow: str
) -> None:
    """A plugin whose import blocks for ever (or whose constructor takes 70 s, longer than
    its worker process is given to start) hung serve's start, and every CLI command that
    names the handlers, for ever. The check gives each item as long as a worker has: then
    exit 2 and one line naming the plugin, and the check process is gone."""
    (tmp_path / "slow_plugin.py").write_text(SLOW)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "PORT": str(free_port()),
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'slow.db'}",
        "LACUNA_HANDLERS": "log,slow_plugin:Slow",
        "SLOW": slow,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", QUICK_CHECK, *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command[0]} hung on a plugin that blocks at start")
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    said = done.stdout + done.stderr
    assert "the 'slow_plugin:Slow' handler was still being imported or built after 3 s" in said, (
        said[-2000:]
    )
    checks = [
        line
        for line in subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if "plugin_check" in line and str(REPO) in line
    ]
    assert not checks  # stopped, with what it started


def test_a_forged_problems_answer_is_one_bounded_line(tmp_path: Path) -> None:
    """A plugin that answers for the process that checks it with problems of its own: one of
    5 MB and 50 000 more, each opening with a terminal escape. They were printed whole; now
    a bounded number of lines, each cut short and escaped."""
    (tmp_path / "forger_plugin.py").write_text(FORGER)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "PORT": str(free_port()),
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'problems.db'}",
        "LACUNA_HANDLERS": "forger_plugin:Forger",
        "FORGE": "problems",
        "FORGER_PATH": str(tmp_path / "problems.txt"),
    }
    done = subprocess.run(
        [CLI, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if "configuration:" in line]
    assert "\\x1b]0;pwned\\x07ppp" in line
    assert "\x1b" not in done.stderr
    assert len(line) < 200_000


@pytest.mark.parametrize("command", [["handlers"], ["serve"]])
def test_an_installed_plugin_with_a_name_no_setting_can_use_is_not_shown(
    tmp_path: Path, command: list[str]
) -> None:
    """A package registering a 10 KB handler name holding a terminal escape (no
    LACUNA_HANDLERS item can name it: a kind is lowercase letters, digits and _): `handlers`
    printed it, and every "unknown handler" line listed it, 10 KB long."""
    dist = tmp_path / "evilname-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evilname\nVersion: 0.1\n")
    name = "x" * 10_000 + "\x1b[2J"
    (dist / "entry_points.txt").write_text(f"[lacuna_webhooks.handlers]\n{name} = os:system\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        "PORT": str(free_port()),
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'names.db'}",
        "LACUNA_HANDLERS": "log,typo" if command == ["serve"] else "log",
    }
    done = subprocess.run(
        [CLI, *command], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == (2 if command == ["serve"] else 0), done.stderr[-2000:]
    assert "xxxxxxxxxx" not in done.stdout + done.stderr
    if command == ["serve"]:
        assert "names unknown handler 'typo' (installed: " in done.stderr
    else:
        assert "  log " in done.stdout


def test_a_plugin_installed_into_this_packages_folder_is_checked_in_a_process_of_its_own(
    tmp_path: Path,
) -> None:
    """Another distribution that installs its module into this package's folder
    (``lacuna_webhooks/x.py``, as a wheel may) and registers it as a handler: its module name
    made it pass for one of ours, so it was imported in serve's own process, and its
    ``os._exit(0)`` at import ended serve with exit code 0 and not a word."""
    import lacuna_webhooks

    module = f"zz_sneaky_{os.getpid()}"
    dist = tmp_path / "sneaky-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sneaky\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[lacuna_webhooks.handlers]\nsneaky = lacuna_webhooks.{module}:Handler\n"
    )
    source = Path(lacuna_webhooks.__file__).parent / f"{module}.py"
    source.write_text("import os\nos._exit(0)\n")
    try:
        done = run_serve(tmp_path, "log,sneaky")
    finally:
        source.unlink()
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    (line,) = [line for line in done.stderr.splitlines() if "configuration:" in line]
    assert "the 'sneaky' handler ended the process that checks it (exited with code 0" in line
