"""A real `serve`: secrets from files, the warning for a secret that cannot be right, and
`send` shaping, resending and load-checking events against it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import orjson
import pytest

from lacuna_webhooks.cli import main
from lacuna_webhooks.samples import sample_event
from tests.conftest import TEST_SECRET
from tests.e2e.conftest import CLI, Serve
from tests.e2e.test_clock_skew import libfaketime, skewed_env

pytestmark = pytest.mark.e2e
SECOND_SECRET = "whsec_test_rotated_new_secret_value_0002"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook-secret"
    path.write_text(f"{SECOND_SECRET},{TEST_SECRET}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def serve(serve_factory: type[Serve], tmp_path: Path, secret_file: Path) -> Serve:
    """serve reading its two secrets from LACUNA_WEBHOOK_SECRET_FILE (the variable blank)."""
    return serve_factory(
        {
            "LACUNA_WEBHOOK_SECRET": "",
            "LACUNA_WEBHOOK_SECRET_FILE": str(secret_file),
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'send.db'}",
        }
    ).start()


def stored(serve: Serve, event_id: str) -> dict[str, object]:
    env = {"LACUNA_DATABASE_URL": serve.env["LACUNA_DATABASE_URL"]}
    result = subprocess.run(
        [CLI, "events", "show", event_id, "--json"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)["payload"]
    assert isinstance(payload, dict)
    return payload


def test_send_shapes_an_event_and_resends_its_id(
    serve: Serve, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--set edits the sample (JSON values, else text), --id fixes the id so a second send
    gets the duplicate answer; send names the secret by position and source, and t."""
    env = {"LACUNA_WEBHOOK_SECRET_FILE": str(secret_file)}
    argv = [
        "send",
        "--url",
        serve.webhook_url,
        "--id",
        "evt_send_same",
        "--secret-index",
        "2",
        "--set",
        "data.title=Rainy Day",
        "--set",
        "data.tracks[0].duration=61.5",
        "--set",
        "data.instrumental=false",
    ]
    assert main(argv, env) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "200 OK"
    assert json.loads(out.splitlines()[1]) == {
        "received": True,
        "id": "evt_send_same",
        "duplicate": False,
    }
    assert re.fullmatch(
        r"signed evt_send_same \(job\.completed\) with secret 2 of 2 "
        r"\(LACUNA_WEBHOOK_SECRET_FILE\), t=\d{10}\n",
        err,
    )
    assert TEST_SECRET not in out + err
    assert SECOND_SECRET not in out + err

    assert main(argv, env) == 0
    assert '"duplicate":true' in capsys.readouterr().out

    payload = stored(serve, "evt_send_same")
    data = payload["data"]
    assert isinstance(data, dict)
    assert data["title"] == "Rainy Day"
    assert data["instrumental"] is False
    assert data["tracks"][0]["duration"] == 61.5


def test_send_file_with_numbers_beyond_a_double_is_read_as_the_receiver_reads_it(
    serve: Serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`send --file` reads any JSON the receiver accepts. With `1e400` in it, the file was
    "not JSON" to --id/--set (exit 2) and its id and type went unnamed; a 30-digit integer
    was rounded to a float when the file was edited."""
    event = sample_event(event_id="evt_file_exact")
    numbers = b',"n":1e400,"m":123456789012345678901234567890,"f":1.50}'
    path = tmp_path / "event.json"
    path.write_bytes(orjson.dumps(event)[:-1] + numbers)
    argv = ["send", "--url", serve.webhook_url, "--secret", TEST_SECRET, "--file", str(path)]
    assert main(argv, {}) == 0
    assert capsys.readouterr().err.startswith("signed evt_file_exact (job.completed) ")
    assert main([*argv, "--id", "evt_file_edited"], {}) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "200 OK"
    assert err.startswith("signed evt_file_edited (job.completed) ")
    payload = stored(serve, "evt_file_edited")
    assert payload["m"] == 123456789012345678901234567890
    assert payload["f"] == 1.5
    assert payload["n"] == float("inf")  # json.loads reads 1E+400 so: it was sent as a number


def test_send_any_type(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    """--type accepts any type: a minimal event, stored as received."""
    argv = ["send", "--url", serve.webhook_url, "--secret", TEST_SECRET, "--type", "job.started"]
    assert main([*argv, "--id", "evt_started", "--set", "data.progress=40"], {}) == 0
    assert "200 OK" in capsys.readouterr().out
    payload = stored(serve, "evt_started")
    assert payload["type"] == "job.started"
    assert payload["data"] == {
        "id": payload["data"]["id"],
        "object": "music.generation",
        "progress": 40,
    }  # type: ignore[index]


def test_send_count_prints_a_latency_summary(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    """--count N --concurrency C: N distinct events, a status count and p50/p90/p99/max."""
    argv = ["send", "--url", serve.webhook_url, "--secret", TEST_SECRET]
    assert main([*argv, "--count", "30", "--concurrency", "4"], {}) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert re.fullmatch(
        rf"sent 30 events to {re.escape(serve.webhook_url)} in [\d.]+ s "
        r"\([\d.]+/s, concurrency 4\)",
        lines[0],
    )
    assert lines[1] == "status: 200 x30"
    assert re.fullmatch(r"latency ms: p50 [\d.]+  p90 [\d.]+  p99 [\d.]+  max [\d.]+", lines[2])
    assert re.fullmatch(r"signed with secret 1 of 1 \(--secret\), t=\d+\.\.\d+\n", err)
    listed = subprocess.run(
        [CLI, "events", "list", "--json", "--limit", "100"],
        env={"PATH": "/usr/bin:/bin", "LACUNA_DATABASE_URL": serve.env["LACUNA_DATABASE_URL"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert len(json.loads(listed.stdout)) == 30  # fresh ids: no duplicates

    # The same id 5 times: one stored, four duplicates, all answered 200.
    assert main([*argv, "--count", "5", "--concurrency", "2", "--id", "evt_load_same"], {}) == 0
    assert "status: 200 x5" in capsys.readouterr().out


def test_send_counts_refusals_and_exits_1(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong secret in a load run: every answer counted as 401, exit code 1."""
    argv = ["send", "--url", serve.webhook_url, "--secret", "whsec_wrong", "--count", "3"]
    assert main(argv, {}) == 1
    assert "status: 401 x3" in capsys.readouterr().out


@pytest.mark.parametrize(("skew", "way"), [("+600s", "behind"), ("-600s", "ahead of")])
def test_send_from_a_machine_whose_clock_is_off_says_by_how_much(
    serve: Serve, skew: str, way: str
) -> None:
    """`send` on a machine whose clock is ten minutes off (libfaketime; the receiver's is
    right) is refused with 401 timestamp_out_of_tolerance; it says whose clock is off, and
    by about how much (the answer's Date against its own t), not only the code."""
    lib = libfaketime()
    env = {
        "PATH": "/usr/bin:/bin",
        **skewed_env(lib, skew),
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
    }
    result = subprocess.run(
        [CLI, "send", "--url", serve.webhook_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "timestamp_out_of_tolerance" in result.stdout
    found = re.search(r"is about (\d+) s (behind|ahead of) this machine's", result.stderr)
    assert found is not None, result.stderr
    assert 595 <= int(found[1]) <= 605
    assert found[2] == way


def serve_log_events(serve: Serve) -> list[dict[str, object]]:
    return [json.loads(x) for x in serve.log().splitlines() if x.startswith("{")]


def test_a_quoted_secret_is_warned_about_once_without_showing_it(
    serve_factory: type[Serve], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`"whsec_…"` with its quotes: one warning at start naming the variable and the
    problem, the value nowhere in the log; the quotes are still part of the secret."""
    quoted = f'"{TEST_SECRET}"'
    serve = serve_factory(
        {"LACUNA_WEBHOOK_SECRET": quoted, "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}"}
    ).start()
    argv = ["send", "--url", serve.webhook_url]
    assert main([*argv, "--secret", TEST_SECRET], {}) == 1  # 401: the quotes are the secret's
    assert main([*argv, "--secret", quoted], {}) == 0
    capsys.readouterr()
    serve.stop()
    warnings = [e for e in serve_log_events(serve) if e.get("event") == "config.secret_suspicious"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["variable"] == "LACUNA_WEBHOOK_SECRET"
    assert warnings[0]["level"] == "warning"
    assert "wrapped in quotes" in str(warnings[0]["problem"])
    assert TEST_SECRET not in serve.log()


def run_serve(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "serve"],
        env={"PATH": "/usr/bin:/bin", "LACUNA_DATABASE_URL": f"sqlite:///{cwd / 'x.db'}", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"LACUNA_WEBHOOK_SECRET": TEST_SECRET, "LACUNA_WEBHOOK_SECRET_FILE": "{file}"},
            "LACUNA_WEBHOOK_SECRET and LACUNA_WEBHOOK_SECRET_FILE are both set: keep one of them",
        ),
        (
            {"LACUNA_WEBHOOK_SECRET_FILE": "{dir}/nope"},
            "LACUNA_WEBHOOK_SECRET_FILE: cannot read {dir}/nope: No such file or directory",
        ),
        (
            {
                "LACUNA_WEBHOOK_SECRET_FILE": "{file}",
                "LACUNA_HANDLERS": "slack",
                "LACUNA_SLACK_WEBHOOK_URL_FILE": "{dir}",
            },
            "LACUNA_SLACK_WEBHOOK_URL_FILE: cannot read {dir}: Is a directory",
        ),
    ],
)
def test_serve_refuses_a_bad_secret_file_in_one_line(
    tmp_path: Path, secret_file: Path, env: dict[str, str], line: str
) -> None:
    """Both forms set, or a file that cannot be read: exit 2 and one line naming the
    variable, never the content."""

    def fill(text: str) -> str:
        return text.replace("{file}", str(secret_file)).replace("{dir}", str(tmp_path))

    result = run_serve({k: fill(v) for k, v in env.items()}, tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"lacuna-webhooks: error: configuration: {fill(line)}\n"
    assert TEST_SECRET not in result.stderr + result.stdout
