"""Whether OpenTelemetry tracing is on, from the standard ``OTEL_*`` variables; no
OpenTelemetry import here.

Tracing is on when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` names an exporter, unless
``OTEL_SDK_DISABLED=true``. Off, nothing of OpenTelemetry is imported and the request path is
the same code as without tracing. On, ``load_tracing`` imports ``tracing.py`` (the ``otel``
extra); every other ``OTEL_*`` variable (headers, timeouts, sampler, service name, batching)
is read by the OpenTelemetry SDK itself, as its documentation says (docs/observability.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .config import NotRegularFile, http_url_problem, read_regular_file
from .errors import ConfigError

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
                f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not available here "
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
                        f"{name}: {protocol} is not available here (only OTLP over HTTP, "
                        f"{', '.join(PROTOCOLS)}; the endpoint is usually port 4318)"
                    )
                break  # the traces-specific variable wins over the general one
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            endpoint = _value(environ, name)
            problem = http_url_problem(endpoint) if endpoint else None
            if problem is not None:
                # Else the exporter started and logged "Invalid URL" at every export.
                problems.append(f"{name} {problem}")
        problems += [p for p in (_file_problem(environ, n) for n in CERTIFICATE_FILES) if p]
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


def load_tracing(environ: Mapping[str, str]) -> Tracing | None:
    """A started ``Tracing`` when the ``OTEL_*`` variables turn tracing on, else ``None``.

    Raises ``ConfigError`` (one line) when they ask for something unavailable, or when
    tracing is on but the ``otel`` extra is not installed.
    """
    exporters = trace_exporters(environ)
    if not exporters:
        return None
    try:
        from .tracing import Tracing
    except ImportError as exc:
        raise ConfigError(
            f"tracing is on (OTEL_* variables) but OpenTelemetry is not installed ({exc.name}): "
            f"{INSTALL_HINT}, or unset OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_TRACES_EXPORTER"
        ) from None
    return Tracing.from_env(exporters)


__all__ = ["EXPORTERS", "INSTALL_HINT", "load_tracing", "trace_exporters"]
