"""Whether OpenTelemetry tracing is on, from the standard ``OTEL_*`` variables; no
OpenTelemetry import here.

Tracing is on when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` names an exporter, unless
``OTEL_SDK_DISABLED=true``. Off, nothing of OpenTelemetry is imported and the request path is
the same code as without tracing. On, ``load_tracing`` imports ``tracing.py`` (the ``otel``
extra), which builds the OpenTelemetry SDK.

Every ``OTEL_*`` value the SDK parses is checked here first (``sdk_settings``): the SDK answers
a malformed one with a traceback at start (a negative batch size, a non-number span limit), in
the middle of the log (``logger.exception`` and its default, for a non-number batch delay), or
with a warning and a default the user did not ask for (an unknown sampler or compression, a
sampler ratio of ``2``, a header it cannot parse). Each is one line here, naming the variable and
what it takes, as the service's own settings are. The sampler and the batch processor's numbers
are then handed to the SDK as arguments, so that it never reads those variables its own way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .config import (
    NotRegularFile,
    check_utf8,
    http_url_problem,
    quoted,
    read_regular_file,
)
from .errors import ConfigError
from .redact import redact_text

if TYPE_CHECKING:
    from .tracing import Tracing

#: The exporters ``OTEL_TRACES_EXPORTER`` may name here (the SDK's own names).
EXPORTERS = ("otlp", "console", "none")
#: The OTLP transport this package ships (``opentelemetry-exporter-otlp-proto-http``).
PROTOCOLS = ("http/protobuf",)
INSTALL_HINT = "pip install 'lacuna-webhooks[otel]'"
#: The OTLP exporter's file settings (the SDK opens them when the exporter starts): each, when
#: set, must name a readable regular file. A FIFO there hung the start; a missing file ended
#: it with a traceback.
CERTIFICATE_FILES = tuple(
    f"OTEL_EXPORTER_OTLP_{scope}{name}"
    for name in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY")
    for scope in ("", "TRACES_")
)


#: The samplers ``OTEL_TRACES_SAMPLER`` may name (the SDK's built-in ones; it has no other).
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
#: The samplers that take ``OTEL_TRACES_SAMPLER_ARG`` (a ratio from 0 to 1).
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
#: The OTLP exporter's compressions.
COMPRESSIONS = ("none", "gzip", "deflate")
#: The OTLP export timeout, in seconds (this SDK reads seconds, not the specification's
#: milliseconds: a 10000 meant as ten seconds would be hours, and is refused).
MAX_EXPORT_TIMEOUT_SECONDS = 3_600.0
#: The batch span processor's variables: (SDK default, least, most, unit). All whole numbers.
BATCH_VARIABLES: dict[str, tuple[int, int, int, str]] = {
    "OTEL_BSP_SCHEDULE_DELAY": (5_000, 1, 3_600_000, "milliseconds"),
    "OTEL_BSP_MAX_QUEUE_SIZE": (2_048, 1, 1_000_000, "spans"),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": (512, 1, 1_000_000, "spans"),
    "OTEL_BSP_EXPORT_TIMEOUT": (30_000, 0, 3_600_000, "milliseconds"),
}
#: The SDK's span limits: whole numbers from 0; blank means no limit (the SDK's reading).
SPAN_LIMITS = (
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
)
MAX_SPAN_LIMIT = 1_000_000_000
#: An HTTP header name (a token) in ``OTEL_EXPORTER_OTLP_HEADERS``; the value, percent-encoded
#: or not, printable ASCII without ``"`` ``,`` ``;`` ``\`` (the SDK's lenient reading).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.0-9A-Za-z^_`|~]+")
_HEADER_VALUE = re.compile(r"[ !#-+\--:<-\[\]-~]*")


def _value(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def trace_exporters(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The span exporters the ``OTEL_*`` variables ask for; ``()`` when tracing is off.

    Raises ``ConfigError`` for an exporter or OTLP protocol this package does not ship.
    """
    disabled = _value(environ, "OTEL_SDK_DISABLED").lower()
    if disabled == "true":
        return ()
    problems = []
    if disabled not in ("", "false"):
        # The SDK reads anything but "true" as false: a typo ("yes", "1") left tracing on.
        problems.append("OTEL_SDK_DISABLED must be true or false")
    named = _value(environ, "OTEL_TRACES_EXPORTER").lower()
    if named:
        exporters = tuple(dict.fromkeys(e.strip() for e in named.split(",") if e.strip()))
        unknown = [e for e in exporters if e not in EXPORTERS]
        if unknown:
            problems.append(
                f"OTEL_TRACES_EXPORTER: {redact_text(', '.join(unknown))} is not available here "
                f"(one or more of {', '.join(EXPORTERS)})"
            )
        exporters = tuple(e for e in exporters if e != "none")
    elif _value(environ, "OTEL_EXPORTER_OTLP_ENDPOINT") or _value(
        environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        exporters = ("otlp",)
    else:
        exporters = ()
    if "otlp" in exporters:
        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = _value(environ, name)
            if protocol:
                if protocol not in PROTOCOLS:
                    problems.append(
                        f"{name}: {redact_text(protocol)} is not available here (only OTLP over "
                        f"HTTP, {', '.join(PROTOCOLS)}; the endpoint is usually port 4318)"
                    )
                break  # the traces-specific variable wins over the general one
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            endpoint = _value(environ, name)
            problem = http_url_problem(endpoint) if endpoint else None
            if problem is not None:
                # Else the exporter started and logged "Invalid URL" at every export.
                problems.append(f"{name} {problem}")
        problems += [p for p in (_file_problem(environ, n) for n in CERTIFICATE_FILES) if p]
    if exporters:
        problems += sdk_settings(environ, exporters)[1]
    if problems:
        raise ConfigError("; ".join(problems))
    return exporters


def _file_problem(environ: Mapping[str, str], name: str) -> str | None:
    """Why the file the variable ``name`` names cannot serve, or ``None`` (also when unset).
    Opened as the settings' own files are (``read_regular_file``): a FIFO does not block."""
    path = _value(environ, name)
    if not path:
        return None
    try:
        read_regular_file(path, 0)
    except (NotRegularFile, IsADirectoryError):
        return f"{name}: {path} is not a regular file"
    except OSError as exc:
        return f"{name}: cannot read {path}: {exc.strerror or type(exc).__name__}"
    return None


@dataclass(frozen=True)
class SdkSettings:
    """What ``tracing.Tracing.from_env`` hands the SDK as arguments, read from ``OTEL_*`` here
    (a blank variable is unset: the SDK's defaults)."""

    sampler: str = "parentbased_always_on"
    sampler_ratio: float = 1.0  # the SDK's default when OTEL_TRACES_SAMPLER_ARG is unset
    schedule_delay_millis: int = BATCH_VARIABLES["OTEL_BSP_SCHEDULE_DELAY"][0]
    max_queue_size: int = BATCH_VARIABLES["OTEL_BSP_MAX_QUEUE_SIZE"][0]
    max_export_batch_size: int = BATCH_VARIABLES["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"][0]
    export_timeout_millis: int = BATCH_VARIABLES["OTEL_BSP_EXPORT_TIMEOUT"][0]


def _whole(value: str, least: int, most: int) -> int | None:
    """``value`` as a whole number from ``least`` to ``most`` in ASCII digits, else ``None``.
    (``int()`` takes ``1_0``, other scripts' digits, and raises past 4300 digits.)"""
    text = value.strip()
    if not re.fullmatch(r"\+?[0-9]+", text):
        return None
    digits = text.lstrip("+").lstrip("0") or "0"
    if len(digits) > len(str(most)):
        return None
    number = int(digits)
    return number if least <= number <= most else None


def _fraction(value: str) -> float | None:
    """``value`` as a finite number in ASCII (no ``_``), else ``None``: what ``float()`` reads
    but for ``1_0``, other scripts' digits, ``nan`` and ``inf``."""
    text = value.strip()
    if not text.isascii() or "_" in text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _first_set(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` set and not empty, and its value: the one the SDK reads
    (``environ.get(a) or environ.get(b)``: the traces-specific variable wins)."""
    for name in names:
        value = environ.get(name, "")
        if value:
            return name, value
    return None


def _header_problem(name: str, value: str) -> str | None:
    """Why ``value`` is not ``key=value,…`` headers the exporter can send, or ``None``. The
    values are not shown: they are usually credentials. (The SDK skips an item it cannot
    parse with a warning, and a decoded value holding a line break or a character beyond
    Latin-1 fails every export.)"""
    for number, item in enumerate(re.split(r"[ \t]*,[ \t]*", value), start=1):
        if not item.strip():
            continue
        key, equals, text = item.strip().partition("=")
        key, text = key.strip(), text.strip()
        if not equals or not _HEADER_NAME.fullmatch(key):
            return f"{name}: item {number} is not key=value with an HTTP header name as key"
        decoded = unquote(text)
        if not _HEADER_VALUE.fullmatch(text) or any(
            ord(c) > 0xFF or ord(c) < 0x20 or ord(c) == 0x7F for c in decoded
        ):
            return (
                f"{name}: the value of {key} must be printable text (percent-encoded or not; "
                "no line breaks, no characters beyond Latin-1 once decoded)"
            )
    return None


def _resource_problem(value: str) -> str | None:
    """Why ``OTEL_RESOURCE_ATTRIBUTES`` is not ``key=value,…``, or ``None`` (the SDK skips such
    an item with a warning)."""
    for number, item in enumerate(value.split(","), start=1):
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            return (
                f"OTEL_RESOURCE_ATTRIBUTES: item {number} ({quoted(item)}) is not key=value "
                "with a non-empty key (comma-separated, values percent-encoded)"
            )
    return None


def _detector_problem(value: str) -> str | None:
    """Why ``OTEL_EXPERIMENTAL_RESOURCE_DETECTORS`` names a detector that is not installed, or
    ``None`` (the SDK logs a traceback for it and goes on without)."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        return None
    from importlib.metadata import entry_points

    installed = set(entry_points(group="opentelemetry_resource_detector").names)
    unknown = [name for name in names if name != "*" and name not in installed]
    if not unknown:
        return None
    return (
        f"OTEL_EXPERIMENTAL_RESOURCE_DETECTORS: {', '.join(map(quoted, unknown))} is not an "
        f"installed resource detector (installed: {', '.join(sorted(installed)) or 'none'}; "
        "* for all)"
    )


def sdk_settings(
    environ: Mapping[str, str], exporters: tuple[str, ...]
) -> tuple[SdkSettings, list[str]]:
    """The ``OTEL_*`` values the SDK would parse, checked; and one line per malformed one.

    ``exporters`` are those ``trace_exporters`` chose: the OTLP exporter's variables matter
    only when it is one of them."""
    problems: list[str] = []
    # Bytes that are not UTF-8 reach the SDK as lone surrogates, which fail at every export.
    for name in sorted(n for n in environ if n.startswith("OTEL_")):
        try:
            check_utf8(name, environ[name])
        except ConfigError as exc:
            problems.append(str(exc))

    numbers: dict[str, int] = {}
    for name, (default, least, most, unit) in BATCH_VARIABLES.items():
        raw = _value(environ, name)
        number = _whole(raw, least, most) if raw else default
        if number is None:
            problems.append(
                f"{name} must be a whole number of {unit} from {least} to {most}, got {quoted(raw)}"
            )
            number = default
        numbers[name] = number
    queue, batch = numbers["OTEL_BSP_MAX_QUEUE_SIZE"], numbers["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]
    if batch > queue:
        problems.append(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}"
            f"{'' if _value(environ, 'OTEL_BSP_MAX_EXPORT_BATCH_SIZE') else ' when unset'}) "
            f"must be at most OTEL_BSP_MAX_QUEUE_SIZE ({queue})"
        )

    for name in SPAN_LIMITS:
        raw = _value(environ, name)
        if raw and _whole(raw, 0, MAX_SPAN_LIMIT) is None:
            problems.append(
                f"{name} must be a whole number from 0 to {MAX_SPAN_LIMIT} "
                f"(blank: no limit), got {quoted(raw)}"
            )

    sampler = _value(environ, "OTEL_TRACES_SAMPLER").lower() or SdkSettings.sampler
    if sampler not in SAMPLERS:
        problems.append(
            f"OTEL_TRACES_SAMPLER must be one of {', '.join(SAMPLERS)}, "
            f"got {quoted(environ['OTEL_TRACES_SAMPLER'])}"
        )
    ratio = SdkSettings.sampler_ratio
    arg = _value(environ, "OTEL_TRACES_SAMPLER_ARG")
    if arg:
        given = _fraction(arg)
        if given is None or not 0.0 <= given <= 1.0:
            problems.append(
                f"OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1 (e.g. 0.1), got {quoted(arg)}"
            )
        elif sampler in SAMPLERS and sampler not in RATIO_SAMPLERS:
            # The SDK ignores it: a ratio asked for, and every request traced.
            problems.append(
                f"OTEL_TRACES_SAMPLER_ARG is set but the sampler {sampler} takes no ratio: "
                f"set OTEL_TRACES_SAMPLER to {' or '.join(RATIO_SAMPLERS)}, "
                "or unset OTEL_TRACES_SAMPLER_ARG"
            )
        else:
            ratio = given

    detectors = _detector_problem(_value(environ, "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS"))
    if detectors is not None:
        problems.append(detectors)
    metrics = _value(environ, "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED")
    if metrics and metrics.lower() not in ("true", "false"):
        # The SDK warns and reads false.
        problems.append(
            f"OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED must be true or false, got {quoted(metrics)}"
        )

    attributes = environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    problem = _resource_problem(attributes) if attributes.strip() else None
    if problem is not None:
        problems.append(problem)

    if "otlp" in exporters:
        found = _first_set(
            environ, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"
        )
        if found is not None:
            name, raw = found
            seconds = _fraction(raw)
            if seconds is None or not 0 < seconds <= MAX_EXPORT_TIMEOUT_SECONDS:
                problems.append(
                    f"{name} must be a number of seconds greater than 0 and at most "
                    f"{MAX_EXPORT_TIMEOUT_SECONDS:g} (this SDK reads seconds), got {quoted(raw)}"
                )
        found = _first_set(
            environ, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"
        )
        if found is not None and found[1].strip().lower() not in COMPRESSIONS:
            problems.append(
                f"{found[0]} must be one of {', '.join(COMPRESSIONS)}, got {quoted(found[1])}"
            )
        found = _first_set(
            environ, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"
        )
        problem = _header_problem(*found) if found is not None else None
        if problem is not None:
            problems.append(problem)

    settings = SdkSettings(
        sampler=sampler if sampler in SAMPLERS else SdkSettings.sampler,
        sampler_ratio=ratio,
        schedule_delay_millis=numbers["OTEL_BSP_SCHEDULE_DELAY"],
        max_queue_size=queue,
        max_export_batch_size=batch,
        export_timeout_millis=numbers["OTEL_BSP_EXPORT_TIMEOUT"],
    )
    return settings, problems


def _sdk_failure(exc: Exception) -> ConfigError:
    """The last resort: whatever the SDK raised while it was built from ``OTEL_*`` (something
    ``sdk_settings`` does not check), as one line rather than a traceback."""
    # A URL in the SDK's message (an endpoint with credentials) is shown redacted.
    detail = redact_text(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    detail = detail if len(detail) <= 200 else detail[:200] + "…"
    return ConfigError(
        "the OpenTelemetry SDK could not start tracing from the OTEL_* variables: "
        f"{type(exc).__name__}{': ' + detail if detail else ''}"
    )


def load_tracing(environ: Mapping[str, str]) -> Tracing | None:
    """A started ``Tracing`` when the ``OTEL_*`` variables turn tracing on, else ``None``.

    Raises ``ConfigError`` (one line) when they ask for something unavailable or malformed,
    when tracing is on but the ``otel`` extra is not installed, or when the SDK raises anything
    while it is built from them.
    """
    exporters = trace_exporters(environ)
    if not exporters:
        return None
    settings, _ = sdk_settings(environ, exporters)  # its problems stopped trace_exporters
    try:
        from .tracing import Tracing
    except ImportError as exc:
        raise ConfigError(
            f"tracing is on (OTEL_* variables) but OpenTelemetry is not installed ({exc.name}): "
            f"{INSTALL_HINT}, or unset OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_TRACES_EXPORTER"
        ) from None
    except Exception as exc:  # the SDK reads some OTEL_* when imported (span limits)
        raise _sdk_failure(exc) from None
    try:
        return Tracing.from_env(exporters, settings)
    except Exception as exc:
        raise _sdk_failure(exc) from None


__all__ = [
    "EXPORTERS",
    "INSTALL_HINT",
    "SdkSettings",
    "load_tracing",
    "sdk_settings",
    "trace_exporters",
]
