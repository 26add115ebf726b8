"""The typed events reach plugin authors: ``mypy --strict`` on the example plugin.

mypy runs as a plugin author's would: from a directory outside this repository (so
our own mypy settings and ``mypy_path`` do not apply), finding ``lacuna_webhooks``
as an installed package, which it only analyses because the package ships
``py.typed``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "examples" / "lacuna-webhooks-jsonl" / "src" / "lacuna_webhooks_jsonl"
MYPY = str(Path(sys.executable).parent / "mypy")

# What a careless plugin would write: each line must be reported, proving the models are
# typed (an Any would let all of them through).
MISUSE = """\
from lacuna_webhooks import Event
from lacuna_webhooks.events import is_job_completed, parse_event


def careless(event: Event) -> float:
    typed = parse_event(event)
    first = typed.data.tracks[0]  # line 7: no guard, UnknownEvent.data has no tracks
    if is_job_completed(typed):
        return typed.data.tracks[0].duration_seconds  # line 9: float | None
    return 0.0 if first is None else 1.0
"""


def run_mypy(tmp_path: Path, *targets: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            MYPY,
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            *map(str, targets),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_package_ships_py_typed() -> None:
    """``py.typed`` sits in the package folder that the wheel is built from."""
    assert (REPO / "service" / "lacuna_webhooks" / "py.typed").is_file()
    assert (PLUGIN / "py.typed").is_file()


def test_mypy_strict_passes_on_the_example_plugin_and_catches_misuse(tmp_path: Path) -> None:
    """The example plugin (typed events, type guards) is clean under --strict, while a
    plugin that reads tracks without the guard, or a duration as a plain float, is not."""
    misuse = tmp_path / "careless_plugin.py"
    misuse.write_text(MISUSE)
    result = run_mypy(tmp_path, PLUGIN, misuse)
    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert not [line for line in lines if "lacuna_webhooks_jsonl" in line], result.stdout
    assert "import-untyped" not in result.stdout  # lacuna_webhooks was analysed, not skipped
    flagged = {int(line.split(":")[1]) for line in lines if "careless_plugin.py" in line}
    assert flagged == {7, 9}, result.stdout
    assert 'has no attribute "tracks"' in result.stdout
    assert "float | None" in result.stdout
