"""The documentation stays true to the code.

- ``docs/configuration.md`` is the one reference of settings: every environment variable the
  code reads has exactly one row in its ``| variable | default | meaning |`` tables, and every
  variable documented there is read by the code.
- ``.env.example`` names only documented variables.
- Every relative link in ``README.md`` and ``docs/`` reaches a file of the repository (and a
  heading, when it names one); nothing links to the contract's old home outside it.
- The signature test vector in ``docs/contract.md`` verifies with the project's own signer.

What "the code reads" is derived from the code itself, two ways, so that neither a new setting
nor a new way of building its name goes unnoticed:

- statically, from every ``.py`` file of the package: string literals that are whole
  ``LACUNA_*`` / ``AWS_*`` / ``OTEL_*`` names (the ``OTEL_*`` ones the service reads itself,
  not those only the OpenTelemetry SDK reads), f-strings ``f"LACUNA_{...}_SUFFIX"`` (a setting
  of every handler, documented as ``LACUNA_<NAME>_SUFFIX``), and the keys a handler module
  passes to its ``HandlerContext`` (``ctx.get("KEY")``, ``ctx.require("KEY")``, any other
  ``ctx`` method, ``helper(ctx, "KEY", ...)``);
- dynamically, by running ``Settings.from_env`` and building every built-in handler over an
  environment that records each name looked up in it.

In the tables, ``<NAME>`` stands for a handler's name in upper case and ``<KEY>`` for any key;
a row with an exact name wins over a row with a placeholder.
"""

from __future__ import annotations

import ast
import asyncio
import re
import shlex
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote

import pytest

from lacuna_webhooks import plugins
from lacuna_webhooks.cli import build_parser
from lacuna_webhooks.config import Settings
from lacuna_webhooks.errors import ConfigError
from lacuna_webhooks.signature import compute_signature, sign

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "service" / "lacuna_webhooks"
DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"
ENV_EXAMPLE = REPO / ".env.example"

HEADER = ("variable", "default", "meaning")
ENV_NAME = re.compile(r"(?:LACUNA|AWS|OTEL)_[A-Z0-9_]*[A-Z0-9]")
KEY = re.compile(r"[A-Z][A-Z0-9_]*[A-Z0-9]")
DOCUMENTED_NAME = re.compile(r"[A-Z](?:[A-Z0-9_]|<NAME>|<KEY>)*")
# Modules whose HandlerContext reads apply to every handler (documented as LACUNA_<NAME>_KEY).
GENERIC_MODULES = frozenset({"plugins.py", "handlers/base.py"})


# --- the reference tables --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of a reference table: where it is and the variable names in its first cell."""

    section: str
    line: int
    names: tuple[str, ...]
    cells: tuple[str, ...]

    def __str__(self) -> str:
        return f"configuration.md:{self.line} (## {self.section})"


def _cells(line: str) -> tuple[str, ...]:
    """A table line's cells, stripped; ``\\|`` inside a cell is not a separator."""
    parts = re.split(r"(?<!\\)\|", line.strip())
    return tuple(part.strip() for part in parts[1:-1])


def reference_rows(text: str) -> list[Row]:
    """Every row of every ``| variable | default | meaning |`` table, in order."""
    rows: list[Row] = []
    section = "(top)"
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if tuple(cell.lower() for cell in cells) == HEADER:
            in_table = True
            continue
        if not in_table or all(set(cell) <= set("-: ") for cell in cells):
            continue
        names = tuple(re.findall(r"`([^`]+)`", cells[0])) if cells else ()
        rows.append(Row(section, number, names, cells))
    return rows


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return reference_rows(CONFIGURATION.read_text(encoding="utf-8"))


def test_reference_tables_are_well_formed(rows: list[Row]) -> None:
    """Each row has three cells and names at least one variable, in backticks, in the first."""
    assert len(rows) > 20, "no reference tables found in docs/configuration.md"
    bad = [
        f"{row}: {' | '.join(row.cells)}"
        for row in rows
        if len(row.cells) != 3
        or not row.names
        or not all(DOCUMENTED_NAME.fullmatch(name) for name in row.names)
    ]
    assert not bad, "malformed reference rows:\n" + "\n".join(bad)


def test_no_variable_has_two_rows(rows: list[Row]) -> None:
    """A variable is described once, in one row of one section, never twice across sections."""
    counts = Counter(name for row in rows for name in row.names)
    twice = {
        name: [str(row) for row in rows if name in row.names]
        for name, count in counts.items()
        if count > 1
    }
    assert not twice, f"documented in more than one row: {twice}"


# --- what the code reads ---------------------------------------------------------------------


class RecordingEnviron(dict[str, str]):
    """An environment that remembers every name looked up with ``get``, ``[]`` or ``in``.

    Copies (``dict(env)``, ``{**env}``) take CPython's dict fast path and record nothing, so
    only real reads count.
    """

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)


def builtin_handlers() -> dict[str, str]:
    """The package's own handlers, from its entry points: name -> module."""
    return {
        name: value.partition(":")[0]
        for name, value in plugins.available().items()
        if value.startswith("lacuna_webhooks.")
    }


def module_files(module: str) -> list[Path]:
    """The source files of a module of the package (all of them for a sub-package)."""
    relative = Path(*module.split(".")[1:])
    package = PACKAGE / relative
    if package.is_dir():
        return sorted(package.rglob("*.py"))
    return [package.with_suffix(".py")]


def sample_settings(tmp_path: Path) -> dict[str, list[dict[str, str]]]:
    """Valid settings for each built-in handler, one per way it reads them (a handler missing
    here is still scanned statically; add it to have its settings checked dynamically too)."""
    return {
        "log": [{}],
        "storage": [
            {"LACUNA_STORAGE_URL": f"file://{tmp_path / 'audio'}"},
            {
                "LACUNA_STORAGE_URL": "s3://audio-archive/lacuna",
                "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
                "AWS_SECRET_ACCESS_KEY": "example-secret",
            },
        ],
        "slack": [{"LACUNA_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/x"}],
        "email": [
            {
                "LACUNA_EMAIL_SMTP_URL": "smtp://mail.example:25",
                "LACUNA_EMAIL_FROM": "lacuna@studio.example",
                "LACUNA_EMAIL_TO": "ana@example.com",
            }
        ],
    }


def _ctx_keys(tree: ast.AST) -> Iterator[str]:
    """Keys passed to a HandlerContext: ``ctx.<any method>("KEY")`` (``get``, ``require``,
    ``env_name``...) or ``helper(ctx, "KEY", ...)``."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, args = node.func, node.args
        receiver = func.value if isinstance(func, ast.Attribute) else None
        on_ctx = (isinstance(receiver, ast.Name) and receiver.id == "ctx") or (
            isinstance(receiver, ast.Attribute) and receiver.attr == "ctx"
        )
        if isinstance(func, ast.Attribute) and on_ctx and args:
            key = args[0]
        elif len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id == "ctx":
            key = args[1]
        else:
            continue
        if (
            isinstance(key, ast.Constant)
            and isinstance(key.value, str)
            and KEY.fullmatch(key.value)
        ):
            yield key.value


def _names_in(tree: ast.AST) -> Iterator[str]:
    """Whole ``LACUNA_*``/``AWS_*``/``OTEL_*`` literals, and ``f"LACUNA_{...}_SUFFIX"`` as a
    pattern."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if ENV_NAME.fullmatch(node.value):
                yield node.value
        elif isinstance(node, ast.JoinedStr) and len(node.values) == 3:
            head, middle, tail = node.values
            if (
                isinstance(head, ast.Constant)
                and head.value == "LACUNA_"
                and isinstance(middle, ast.FormattedValue)
                and isinstance(tail, ast.Constant)
                and isinstance(tail.value, str)
                and re.fullmatch(r"_[A-Z][A-Z0-9_]*[A-Z0-9]", tail.value)
            ):
                yield f"LACUNA_<NAME>{tail.value}"


def read_by_code(tmp_path: Path) -> set[str]:
    """Every variable name the package reads (placeholders for what every handler reads)."""
    names: set[str] = set()
    builtins = builtin_handlers()
    handler_files = {
        path: name for name, module in builtins.items() for path in module_files(module)
    }
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names.update(_names_in(tree))
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in GENERIC_MODULES:
            names.update(f"LACUNA_<NAME>_{key}" for key in _ctx_keys(tree))
        elif path in handler_files:
            prefix = f"LACUNA_{handler_files[path].upper()}_"
            names.update(prefix + key for key in _ctx_keys(tree))

    env = RecordingEnviron({"LACUNA_WEBHOOK_SECRET": "whsec_docs_test"})
    Settings.from_env(env)
    names.update(env.read)

    samples = sample_settings(tmp_path)
    for name in builtins:
        for values in samples.get(name, [{}]):
            env = RecordingEnviron(values)
            try:
                handler_set = plugins.build_handlers([name], env)
            except ConfigError:
                if name in samples:
                    raise  # the sample itself went stale: fix it, or nothing is checked
            else:
                asyncio.run(handler_set.aclose())
            names.update(env.read)
    return names


@pytest.fixture(scope="module")
def read(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return read_by_code(tmp_path_factory.mktemp("docs"))


def _pattern(name: str) -> re.Pattern[str]:
    handlers = "|".join(sorted(n.upper() for n in builtin_handlers()))
    regex = re.escape(name).replace(re.escape("<NAME>"), f"(?:{handlers})")
    return re.compile(regex.replace(re.escape("<KEY>"), "[A-Z0-9_]+"))


def rows_for(variable: str, rows: list[Row]) -> list[Row]:
    """The rows documenting ``variable``: its own, else the placeholder rows that match it."""
    exact = [row for row in rows if variable in row.names]
    if exact or "<" in variable:
        return exact
    return [
        row
        for row in rows
        if any("<" in name and _pattern(name).fullmatch(variable) for name in row.names)
    ]


def test_the_scan_finds_what_the_code_reads(read: set[str]) -> None:
    """The derivation itself works: settings, per-handler names and AWS names all show up."""
    assert {"LACUNA_WEBHOOK_SECRET", "HOST", "PORT", "LACUNA_LOG_LEVEL"} <= read
    assert {"LACUNA_<NAME>_TIMEOUT", "LACUNA_<NAME>_EVENTS"} <= read
    assert {"LACUNA_SLACK_WEBHOOK_URL", "LACUNA_STORAGE_CONNECT_TIMEOUT", "AWS_REGION"} <= read


def test_every_variable_the_code_reads_has_exactly_one_row(read: set[str], rows: list[Row]) -> None:
    """Nothing the service reads is undocumented, and nothing is documented twice."""
    missing = sorted(v for v in read if not rows_for(v, rows))
    twice = {v: [str(r) for r in rows_for(v, rows)] for v in read if len(rows_for(v, rows)) > 1}
    assert not missing, f"read by the code, missing from docs/configuration.md: {missing}"
    assert not twice, f"matched by more than one row of docs/configuration.md: {twice}"


def test_every_documented_variable_is_read(read: set[str], rows: list[Row]) -> None:
    """No row documents a variable the code never reads (a stale or misspelt name)."""
    unread = [
        f"{name} ({row})"
        for row in rows
        for name in row.names
        if name not in read and not ("<" in name and any(_pattern(name).fullmatch(v) for v in read))
    ]
    assert not unread, f"documented but not read by the code: {unread}"


def test_env_example_names_only_documented_variables(rows: list[Row]) -> None:
    """Every ``NAME=`` line of ``.env.example`` (set or commented out) has its row."""
    names = re.findall(
        r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(encoding="utf-8"), flags=re.M
    )
    assert "LACUNA_WEBHOOK_SECRET" in names
    undocumented = sorted({name for name in names if len(rows_for(name, rows)) != 1})
    assert not undocumented, f".env.example names undocumented variables: {undocumented}"


def env_example_values() -> dict[str, str]:
    """The ``NAME=value`` lines of ``.env.example`` that set a value (not commented out)."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"([A-Z][A-Z0-9_]*)=(.+)$", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def test_env_example_shows_the_documented_defaults(rows: list[Row]) -> None:
    """``.env.example`` says "shown values are the defaults": each value it sets is the
    default its row documents, and the code reads it so too (settings built with and without
    those lines are equal), so copying it to ``.env`` changes nothing."""
    values = env_example_values()
    assert {"PORT", "LACUNA_DATABASE_URL", "LACUNA_RETRY_MAX_ATTEMPTS"} <= values.keys()
    differ = []
    for name, value in values.items():
        (row,) = rows_for(name, rows)
        documented = re.match(r"`([^`]*)`", row.cells[1])
        if documented is None or documented.group(1) != value:
            differ.append(f"{name}={value} ({row}: default {row.cells[1]})")
    assert not differ, f".env.example shows values that are not the defaults: {differ}"
    base = {"LACUNA_WEBHOOK_SECRET": "whsec_docs_test"}
    with_example = Settings.from_env({**values, **base})
    without = Settings.from_env(base)
    assert replace(with_example, environ={}) == replace(without, environ={})


# --- links -----------------------------------------------------------------------------------

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", flags=re.M)


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def _without_code(text: str) -> str:
    """The text with fenced code blocks and inline code blanked out (links in code are text)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (``-1``, ``-2`` for repeats)."""
    anchors: set[str] = set()
    seen: Counter[str] = Counter()
    for line in _without_fences(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def _without_fences(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)


def links(path: Path) -> list[str]:
    text = _without_code(path.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def test_there_are_docs_to_check() -> None:
    """The link check below has something to check (the index links every page)."""
    assert (DOCS / "README.md").exists()
    assert len(links(DOCS / "README.md")) >= 10


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_link_leaves_the_repository(path: Path) -> None:
    """The contract lives in docs/contract.md: nothing points at ../shared any more."""
    text = path.read_text(encoding="utf-8")
    assert "../shared" not in text
    assert "shared/SPEC.md" not in text


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(path: Path) -> None:
    """Each relative link names a file or folder inside the repository, and an existing
    heading when it has a ``#fragment`` into a Markdown file."""
    broken: list[str] = []
    for target in links(path):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # https:, mailto: ...
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not resolved.is_relative_to(REPO):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in heading_anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(REPO)}: broken links: {broken}"


#: A file named in inline code: a path of the repository, or of the package (``store/base.py``).
NAMED_FILE = re.compile(
    r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*\.(?:md|py|yaml|yml|json|toml|sh|lua)"
)
#: Named in inline code, but not files of the repository: what the storage handler writes.
NOT_REPOSITORY_FILES = frozenset({"event.json"})


def named_files(path: Path) -> list[tuple[int, str]]:
    """``(line, name)`` of each file named in inline code outside fenced blocks (``docs/http.md``,
    ``store/base.py``, ``SPEC.md``); absolute paths and templates are an example's, not ours."""
    found: list[tuple[int, str]] = []
    text = _without_fences(path.read_text(encoding="utf-8"))
    for number, line in enumerate(text.splitlines(), start=1):
        for token in re.findall(r"`([^`\s]+)`", line):
            if NAMED_FILE.fullmatch(token) and token not in NOT_REPOSITORY_FILES:
                found.append((number, token))
    return found


def _repository_file(name: str) -> bool:
    """A path of the repository, of the package or of a folder the docs name files in; a bare
    file name anywhere in the repository's tracked folders."""
    if "/" not in name:
        folders = (REPO / "service", REPO / "tests", REPO / "bench", REPO / "deploy", DOCS)
        found = any(next(folder.rglob(name), None) is not None for folder in folders)
        return found or (REPO / name).exists()
    bases = (REPO, REPO / "service", PACKAGE.parent, PACKAGE, DOCS, REPO / "deploy")
    return any((base / name).exists() for base in bases)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_file_named_in_code_exists(path: Path) -> None:
    """A file the text names in inline code (``tests/e2e/test_live.py``, ``store/base.py``) is
    there: a page that sent the reader to ``SPEC.md``, which is not in the repository (the
    contract is docs/contract.md), passed the link check, being no link."""
    missing = [f"line {n}: {name}" for n, name in named_files(path) if not _repository_file(name)]
    assert not missing, f"{path.relative_to(REPO)} names files that do not exist: {missing}"


def example_commands(path: Path) -> list[list[str]]:
    """The arguments of each ``$ … lacuna-webhooks COMMAND …`` line of a fenced block (a
    trailing ``# comment`` dropped); a synopsis, with ``[optional]`` parts, is not an example."""
    commands: list[list[str]] = []
    for block in re.findall(
        r"^```[a-z]*\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S
    ):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            found = re.search(r"(?:^|\s)(?:\S*/)?lacuna-webhooks\s+(.*)$", line)
            if not line.startswith("$ ") or found is None or "[" in found.group(1):
                continue
            commands.append(shlex.split(re.split(r"\s+#\s", found.group(1))[0]))
    return commands


def test_there_are_example_commands() -> None:
    assert sum(len(example_commands(path)) for path in markdown_files()) >= 15


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_example_command_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each example command line a page shows is accepted by the CLI's own parser: a renamed
    option or command would leave the example failing for whoever pastes it."""
    refused = []
    for argv in example_commands(path):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                refused.append(f"{' '.join(argv)}: {capsys.readouterr().err.strip()}")
    assert not refused, f"{path.relative_to(REPO)}: examples the CLI refuses: {refused}"


# --- the contract's test vector --------------------------------------------------------------


def test_contract_test_vector_verifies() -> None:
    """docs/contract.md's 369-byte body, secret and t give the v1 it states (with the rotated
    secret too), computed by the project's signer."""
    text = (DOCS / "contract.md").read_text(encoding="utf-8")
    vector = text[text.index("Test vector") :]
    secret = re.search(r"secret `(whsec_test_[A-Za-z0-9]+)`", vector)
    second = re.search(r"second secret `(whsec_[A-Za-z0-9_]+)`", vector)
    timestamp = re.search(r"`t=(\d+)`", vector)
    body = re.search(r"```\n(.*?)\n```", vector, flags=re.S)
    expected = re.search(r"gives `v1=([0-9a-f]{64})`", vector)
    header = re.search(r"`(t=\d+(?:,v1=[0-9a-f]{64})+)`", vector)
    assert secret, "no secret in the test vector"
    assert second, "no rotated secret in the test vector"
    assert timestamp, "no t= in the test vector"
    assert body, "no body block in the test vector"
    assert expected, "no v1 in the test vector"
    assert header, "no rotated header in the test vector"
    raw = body.group(1).encode()
    assert len(raw) == 369
    t = int(timestamp.group(1))
    assert compute_signature(raw, secret.group(1), t) == expected.group(1)
    assert sign(raw, [second.group(1), secret.group(1)], t) == header.group(1)
