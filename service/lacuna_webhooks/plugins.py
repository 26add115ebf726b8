"""Resolve ``LACUNA_HANDLERS`` into built handler instances, each with its event filter.

An item is ``KIND`` or ``NAME=KIND`` (SPEC §6): the instance ``NAME`` (plain
``KIND``: the kind's own name) is the delivery's ``handler`` and the prefix of
its settings, ``LACUNA_<NAME>_*``. A kind is looked up, in order, as an entry point of the group
``lacuna_webhooks.handlers`` (the built-ins are registered there too) or, when
it contains ``:``, imported as ``package.module:attr``. The object found is a
factory called with a ``HandlerContext``. The event filter is
``LACUNA_<NAME>_EVENTS`` (comma-separated types, ``*`` for all) when set,
else the handler's own ``events`` attribute. Like every handler setting, each
may also come from a file named by ``LACUNA_<NAME>_<KEY>_FILE``.

Per instance, ``LACUNA_<NAME>_TIMEOUT``, ``_CONCURRENCY``, ``_RETRY_MAX_ATTEMPTS``,
``_RETRY_BASE_DELAY`` and ``_RETRY_MAX_DELAY`` override the global values
(SPEC §6), with the same bounds and error lines; they, the flow-control settings
(``_RATE_LIMIT``, ``_PAUSE_AFTER_FAILURES``) and the handler's own settings are
validated here at start, every bad one of every instance reported at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import itertools
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, TypeVar

import structlog

from .config import (
    HANDLER_NAME_RE,
    MAX_CONCURRENCY,
    MAX_DELAY_SECONDS,
    MAX_RETRY_ATTEMPTS,
    MAX_TIMEOUT_SECONDS,
    MIN_DELAY_SECONDS,
    at_most,
    parse_list,
    positive_float,
    read_setting,
    split_handler_item,
)
from .errors import ConfigError
from .handlers._common import float_setting, int_setting
from .handlers.base import Handler, HandlerContext, HandlerFactory, settle
from .models import Event
from .redact import (
    UNREADABLE_MESSAGE,
    exception_text,
    mask_secrets,
    printable,
    redact_text,
    value_text,
)
from .retry import RetryPolicy

ENTRY_POINT_GROUP = "lacuna_webhooks.handlers"
T = TypeVar("T")


#: The most of an entry point's ``module:attr`` that ``available`` shows.
MAX_TARGET_CHARS = 200


def available() -> dict[str, str]:
    """Installed handler plugins: name -> ``module:attr`` (``a:X or b:Y`` for a name that
    several installed packages register: ``load_factory`` refuses it), each cut short.

    Only names that ``LACUNA_HANDLERS`` can name as a KIND (lowercase letters, digits, ``_``):
    an installed package's 10 KB name, or one holding a terminal escape, made every
    ``unknown handler`` line 10 KB long and ``handlers`` print it, for a kind no setting
    could ever use."""
    found: dict[str, list[str]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if not HANDLER_NAME_RE.fullmatch(ep.name):
            continue
        targets = found.setdefault(ep.name, [])
        target = (
            ep.value if len(ep.value) <= MAX_TARGET_CHARS else ep.value[:MAX_TARGET_CHARS] + "…"
        )
        if target not in targets:
            targets.append(target)
    return {name: " or ".join(targets) for name, targets in found.items()}


def _registered_by(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return f"{name} ({ep.value})" if name else ep.value


#: A handler's constructor still running after this many seconds is named in a warning
#: (then again at each multiple): one that blocks hung the start without a word.
SLOW_BUILD_SECONDS = 10.0


_BUILD_HINT = "a handler's constructor must not block: connect lazily, in handle()"
_IMPORT_HINT = "a plugin's module must not block when imported: connect lazily, in handle()"


@contextlib.contextmanager
def _slow_build_warning(
    item: str, event: str = "handler.build_slow", hint: str = _BUILD_HINT
) -> Iterator[None]:
    """Warn ``event`` (``handler.build_slow``, or ``handler.import_slow`` around the import
    of a plugin's module) while the step runs longer than ``SLOW_BUILD_SECONDS``, every
    ``SLOW_BUILD_SECONDS`` (from a timer thread: the plugin's code may hold this one)."""
    done = threading.Event()

    def watch() -> None:
        waited = 0.0
        while not done.wait(SLOW_BUILD_SECONDS):
            waited += SLOW_BUILD_SECONDS
            structlog.get_logger("lacuna_webhooks.plugins").warning(
                event, handler=item, seconds=waited, hint=hint
            )

    watcher = threading.Thread(target=watch, name=f"build-watch-{item[:40]}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def load_factory(name: str) -> tuple[str, HandlerFactory]:
    """Find the factory of one handler KIND; return (its default instance name, factory).

    Raises ``ConfigError`` (one line) when the kind is unknown or fails to load."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            # A module that blocks at import (a connection made at module level) hung serve
            # at start without a word.
            with _slow_build_warning(name, "handler.import_slow", _IMPORT_HINT):
                obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            # Its own `name` (a metaclass property, a str subclass whose __hash__ would run
            # wherever the name is used) is its code too: a plain str, or the attr's name.
            handler_name = getattr(obj, "name", None)
            if isinstance(handler_name, str) and HANDLER_NAME_RE.fullmatch(handler_name):
                handler_name = str.__str__(handler_name)
            else:
                handler_name = attr.rsplit(".", 1)[-1].lower()
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(
                f"LACUNA_HANDLERS names {name!r}, which cannot be loaded: "
                + _plugin_error(exc).partition(": ")[2]
            ) from None
        except KeyboardInterrupt:
            raise  # a real Ctrl-C during the start stops it as one
        except BaseException as exc:  # the plugin boundary: the module's own code ran
            raise ConfigError(
                f"LACUNA_HANDLERS names {name!r}, which cannot be loaded: {_plugin_error(exc)}"
            ) from None
        if not HANDLER_NAME_RE.fullmatch(handler_name):
            raise ConfigError(
                f"LACUNA_HANDLERS names {name!r}: give the handler a `name` attribute of "
                "lowercase letters, digits and _"
            )
        return handler_name, obj
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(sorted(available())) or "none installed"
        raise ConfigError(
            f"LACUNA_HANDLERS names unknown handler {name!r} (installed: {known}; "
            "or give package.module:attr)"
        )
    if len({ep.value for ep in matches}) > 1:
        # Which one loaded depended on the order of sys.path, and `handlers` listed
        # another: a package could stand in for a built-in handler without a word.
        owners = ", ".join(sorted({_registered_by(ep) for ep in matches}))
        raise ConfigError(
            f"LACUNA_HANDLERS names {name!r}, which several installed packages register: "
            f"{owners}; uninstall all but one, or name the one meant as module:attr"
        )
    try:
        with _slow_build_warning(name, "handler.import_slow", _IMPORT_HINT):
            factory = matches[0].load()
    except KeyboardInterrupt:
        raise  # a real Ctrl-C during the start stops it as one
    except ConfigError as exc:  # the plugin's own line (e.g. which pip extra installs its
        raise ConfigError(plugin_problems(exc, name)) from None  # library)
    except BaseException as exc:  # a broken plugin is one clear config line, not a traceback
        raise ConfigError(
            f"LACUNA_HANDLERS: the {name!r} plugin failed to load: {_plugin_error(exc)}"
        ) from None
    return name, factory


def parse_events(
    value: str | None, default: frozenset[str] | None, var: str = "LACUNA_<NAME>_EVENTS"
) -> frozenset[str] | None:
    """``LACUNA_<NAME>_EVENTS`` (``var``): unset keeps ``default``; ``*`` means every type.
    A value that names no type (``,`` or ``" , "``) is a ``ConfigError``: read as the empty
    list, it left the handler subscribed to nothing, every event stored with no delivery
    for it and nothing said."""
    if value is None or not value.strip():
        return default
    types = parse_list(value)
    if not types:
        raise ConfigError(
            f"{var} names no event type: list types comma-separated, * for every type, or "
            "unset it for the handler's own"
        )
    if "*" in types:
        return None
    return frozenset(types)


@dataclass(frozen=True)
class HandlerSet:
    """The configured handler instances, by name, with the event types each subscribes to.

    ``items`` maps each name to its ``LACUNA_HANDLERS`` item (what a worker process
    rebuilds it from); ``kinds`` to its KIND; ``concurrency`` and ``policies`` hold the
    per-instance values (absent: the dispatcher's global ones).
    """

    handlers: Mapping[str, Handler]
    filters: Mapping[str, frozenset[str] | None]
    timeouts: Mapping[str, float]
    items: Mapping[str, str] = field(default_factory=dict)
    kinds: Mapping[str, str] = field(default_factory=dict)
    concurrency: Mapping[str, int] = field(default_factory=dict)
    policies: Mapping[str, RetryPolicy] = field(default_factory=dict)
    # LACUNA_<NAME>_AFTER: the instances whose deliveries of an event must end first.
    after: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, handlers: Iterable[Handler], *, timeout_seconds: float = 60.0) -> HandlerSet:
        """Build from handler objects, using each one's own ``events`` as its filter."""
        built = {h.name: h for h in handlers}
        return cls(
            built,
            {n: getattr(h, "events", None) for n, h in built.items()},
            dict.fromkeys(built, timeout_seconds),
        )

    @property
    def names(self) -> list[str]:
        return list(self.handlers)

    def subscribers(self, event_type: str) -> list[str]:
        """Names of the handlers that want an event of this type."""
        return [
            name for name, types in self.filters.items() if types is None or event_type in types
        ]

    def without_instances(self) -> HandlerSet:
        """The same names, filters, timeouts and per-instance settings, holding no handler
        object.

        For a process whose handlers run in worker processes of their own (``serve``,
        ``worker``): its copies were built only to check the settings and learn the
        filters, and are dropped unused, so their ``aclose`` never runs here. A plugin's
        ``aclose`` that blocked (``time.sleep``) once hung ``serve`` at shutdown forever.
        """
        return dataclasses.replace(
            self, handlers={name: _RunsElsewhere(name) for name in self.handlers}
        )

    async def aclose(self) -> None:
        """Close every handler; one that fails or hangs past ``ACLOSE_TIMEOUT_SECONDS`` is
        logged and the others are closed all the same."""
        for name, handler in self.handlers.items():
            try:
                async with asyncio.timeout(ACLOSE_TIMEOUT_SECONDS):
                    await settle(handler.aclose())
            except Exception as exc:
                structlog.get_logger("lacuna_webhooks.plugins").warning(
                    "handler.aclose_failed", handler=name, error=redact_text(repr(exc))[:500]
                )


#: How long one handler's ``aclose`` may take when a ``HandlerSet`` is closed.
ACLOSE_TIMEOUT_SECONDS = 5.0


class _RunsElsewhere:
    """Stands for a handler that runs in a worker process: nothing to call or close here."""

    events: frozenset[str] | None = None

    def __init__(self, name: str) -> None:
        self.name = name

    async def handle(self, event: Event) -> None:
        raise RuntimeError(f"the {self.name!r} handler runs in its worker process")

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True)
class BuildRequest:
    """The arguments of one ``build_handlers`` call, as ``serve`` and ``worker`` make it at
    start: picklable, so that ``plugin_check`` can make the same call in a child process."""

    items: tuple[str, ...]
    environ: Mapping[str, str] = field(repr=False)
    allow_private_urls: bool = False
    timeout_seconds: float = 60.0
    concurrency: int = 4
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    check_order: bool = True

    def build(self, on_item: Callable[[str], None] | None = None) -> HandlerSet:
        """``build_handlers`` with these arguments (``ConfigError`` as it)."""
        return build_handlers(
            self.items,
            self.environ,
            allow_private_urls=self.allow_private_urls,
            timeout_seconds=self.timeout_seconds,
            concurrency=self.concurrency,
            policy=self.policy,
            check_order=self.check_order,
            on_item=on_item,
        )


#: Where this package's own handlers live: code that may run in ``serve``'s process.
_OWN_PREFIX = __name__.rsplit(".", 1)[0] + "."


def runs_foreign_code(items: Iterable[str]) -> bool:
    """Whether loading ``items`` (``LACUNA_HANDLERS``) would run code that is not this
    package's: a ``package.module:attr`` outside it, or an entry point another distribution
    registers. An item that cannot be resolved loads nothing (``build_handlers`` reports it).
    Reads entry-point metadata only; imports nothing."""
    kinds: set[str] = set()
    for item in items:
        try:
            _, kind = split_handler_item(item)
        except ConfigError:
            continue
        if ":" not in kind:
            kinds.add(kind)
        elif not (kind.partition(":")[0] + ".").startswith(_OWN_PREFIX):
            return True
    # One scan of the installed metadata for every named kind, not one per item.
    return any(
        ep.name in kinds and not _registered_by_us(ep)
        for ep in entry_points(group=ENTRY_POINT_GROUP)
    )


#: This package's distribution (pyproject's ``name``), as ``_registered_by_us`` compares it.
_OWN_DISTRIBUTION = "lacuna-webhooks"


def _registered_by_us(ep: Any) -> bool:
    """Whether the entry point ``ep`` is one of this package's own handlers: registered by
    this distribution, to a module of this package. The module's name alone is not enough:
    another distribution can install a module into this package's folder
    (``lacuna_webhooks/x.py``) and register it; whose ``os._exit(0)`` at import then ran in
    ``serve``'s process, which exited 0 without a word."""
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    if not isinstance(name, str):
        return False
    return re.sub(r"[-_.]+", "-", name).lower() == _OWN_DISTRIBUTION and ep.value.startswith(
        _OWN_PREFIX
    )


def resolve_items(
    items: Iterable[str], on_item: Callable[[str], None] | None = None
) -> list[tuple[str, frozenset[str] | None]]:
    """Each item's instance name and its kind's own event filter (the factory's ``events``),
    loading each kind without building an instance: what the CLI needs to name and filter
    handlers whose settings may be wrong. Raises ``ConfigError`` for the first item that
    cannot be loaded, or whose ``events`` is not what ``build_handlers`` takes (read as it
    reads it: a string was taken as a set of characters, and an ``events = 5`` ended the
    check process with a traceback). ``on_item`` as in ``build_handlers``."""
    resolved: list[tuple[str, frozenset[str] | None]] = []
    for item in items:
        if on_item is not None:
            on_item(item)
        name, kind = split_handler_item(item)
        default_name, factory = load_factory(kind)
        try:
            default = _declared_events(item, getattr(factory, "events", None))
        except KeyboardInterrupt:
            raise  # a real Ctrl-C during the start stops it as one
        except ConfigError as exc:
            raise ConfigError(plugin_problems(exc, item)) from None
        except BaseException as exc:  # the plugin boundary: its `events` runs its code
            raise ConfigError(
                f"LACUNA_HANDLERS: the {item!r} handler's events cannot be read: "
                + _plugin_error(exc)
            ) from None
        resolved.append((name or default_name, default))
    return resolved


def build_handlers(
    names: Sequence[str],
    environ: Mapping[str, str],
    *,
    allow_private_urls: bool = False,
    timeout_seconds: float = 60.0,
    concurrency: int = 4,
    policy: RetryPolicy | None = None,
    check_order: bool = True,
    on_item: Callable[[str], None] | None = None,
) -> HandlerSet:
    """Load and build every ``LACUNA_HANDLERS`` item (``KIND`` or ``NAME=KIND``) as an
    instance; raise one ``ConfigError`` listing every problem (two instances with one
    name among them). ``concurrency`` and ``policy`` are the global values each
    instance's ``LACUNA_<NAME>_CONCURRENCY`` / ``_RETRY_*`` override. ``check_order=False``
    leaves ``LACUNA_<NAME>_AFTER`` unchecked against the other items (a worker process, or
    ``handlers``, building one instance alone). ``on_item(item)`` is called before each item
    is loaded (``plugin_check`` reports it, to name the item that ended its process)."""
    found = _Instances(
        environ,
        allow_private_urls=allow_private_urls,
        timeout_seconds=timeout_seconds,
        concurrency=concurrency,
        policy=policy or RetryPolicy(),
    )
    for item in names:
        if on_item is not None:
            on_item(item)
        try:
            explicit, kind = split_handler_item(item)
            default_name, factory = load_factory(kind)
        except ConfigError as exc:
            found.problems.extend(exc.problems)
            continue
        name = explicit or default_name
        if name in found.items:
            found.problems.append(
                f"LACUNA_HANDLERS names the handler {name!r} twice: give each instance "
                "its own NAME=KIND"
            )
            continue
        ctx = found.settings(name, item, kind)
        try:
            with _slow_build_warning(item):
                handler = factory(ctx)
                default_events = _check_handler(item, handler)  # an `events` may block too
            handler.name = name
            events = parse_events(ctx.get("EVENTS"), default_events, ctx.env_name("EVENTS"))
            found.add(name, kind, handler, ctx, events)
        except ConfigError as exc:
            found.problems.extend(plugin_problems(exc, item))
        except KeyboardInterrupt:
            raise  # a real Ctrl-C during the start stops it as one
        except BaseException as exc:  # the plugin boundary: a factory's bug is one clear line
            found.problems.append(
                f"LACUNA_HANDLERS: the {item!r} handler failed to start: " + _plugin_error(exc)
            )
    return found.handler_set(check_order)


#: The most of a plugin's exception message a start problem shows.
MAX_PLUGIN_ERROR_CHARS = 500


@dataclass
class _Instances:
    """What ``build_handlers`` and ``instances_of`` gather per instance, with the global
    values each instance's own settings override, and the ``HandlerSet`` they make."""

    environ: Mapping[str, str]
    allow_private_urls: bool
    timeout_seconds: float
    concurrency: int
    policy: RetryPolicy
    problems: list[str] = field(default_factory=list)
    handlers: dict[str, Handler] = field(default_factory=dict)
    filters: dict[str, frozenset[str] | None] = field(default_factory=dict)
    timeouts: dict[str, float] = field(default_factory=dict)
    items: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)
    policies: dict[str, RetryPolicy] = field(default_factory=dict)
    after: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def settings(self, name: str, item: str, kind: str) -> HandlerContext:
        """What the service itself reads for the instance ``name`` of ``item``: its context
        (with its timeout), its concurrency, retry policy and AFTER, every bad setting added
        to ``problems``. The environment's alone: no plugin code runs here."""
        # Dispatch imports this module.
        from .dispatch.flow import read_flow_control

        self.items[name] = item
        # Each override is checked on its own, so that every bad one of every instance is
        # reported at once (SPEC §4: one ConfigError listing each problem), the handler's
        # own settings too.
        problems, environ = self.problems, self.environ
        ctx = HandlerContext(
            name=name,
            environ=environ,
            allow_private_urls=self.allow_private_urls,
            timeout_seconds=_checked(
                problems,
                self.timeout_seconds,
                _handler_timeout,
                name,
                environ,
                self.timeout_seconds,
            ),
            kind=kind,
        )
        self.slots[name] = _checked(
            problems,
            self.concurrency,
            int_setting,
            ctx,
            "CONCURRENCY",
            self.concurrency,
            MAX_CONCURRENCY,
        )
        self.policies[name] = _instance_policy(ctx, self.policy, problems)
        self.after[name] = tuple(parse_list(_checked(problems, None, ctx.get, "AFTER") or ""))
        try:
            read_flow_control([name], environ)  # read again where dispatch runs
        except ConfigError as exc:
            problems.extend(exc.problems)
        return ctx

    def add(
        self,
        name: str,
        kind: str,
        handler: Handler,
        ctx: HandlerContext,
        events: frozenset[str] | None,
    ) -> None:
        """The instance ``name`` (``settings`` read first) with its handler and filter."""
        self.handlers[name] = handler
        self.kinds[name] = kind
        self.timeouts[name] = ctx.timeout_seconds
        self.filters[name] = events

    def handler_set(self, check_order: bool) -> HandlerSet:
        """The set; ``ConfigError`` with every problem found, the AFTER order's too when
        ``check_order``."""
        if not self.problems and check_order:
            self.problems.extend(check_after(self.after))
        if self.problems:
            raise ConfigError(self.problems)
        return HandlerSet(
            self.handlers,
            self.filters,
            self.timeouts,
            self.items,
            self.kinds,
            self.slots,
            self.policies,
            {n: a for n, a in self.after.items() if a},
        )


def instances_of(
    request: BuildRequest,
    items: Mapping[str, str],
    defaults: Mapping[str, frozenset[str] | None],
) -> HandlerSet:
    """The ``HandlerSet`` that ``request.build()`` makes, from what only building the
    plugins tells (``items``: each instance's name, and its item; ``defaults``: its handler's
    own ``events``), the rest read here from the environment as ``build_handlers`` reads it.

    For an answer of ``plugin_check``'s child, which a plugin can forge (it runs there):
    ``ConfigError`` (one line) unless ``items`` names every item of the request once, in
    order, under a name it can have (its ``NAME=``, or an entry point's own name; a
    ``module:attr``'s name is the plugin's to say), and every setting is checked again, so
    that a forged answer can misconfigure at most the plugins' names and default events,
    never the service's settings (a timeout of 1e308 stopped every claim)."""
    names = list(items)
    if [items[n] for n in names] != list(request.items) or set(defaults) != set(names):
        raise ConfigError(_FORGED)
    found = _Instances(
        request.environ,
        allow_private_urls=request.allow_private_urls,
        timeout_seconds=request.timeout_seconds,
        concurrency=request.concurrency,
        policy=request.policy,
    )
    for name in names:
        explicit, kind = split_handler_item(items[name])
        if not HANDLER_NAME_RE.fullmatch(name) or name != (
            explicit or (name if ":" in kind else kind)
        ):
            raise ConfigError(_FORGED)
        ctx = found.settings(name, items[name], kind)
        events = _checked(found.problems, None, ctx.get, "EVENTS")
        types = _checked(
            found.problems,
            defaults[name],
            parse_events,
            events,
            defaults[name],
            ctx.env_name("EVENTS"),
        )
        found.add(name, kind, _RunsElsewhere(name), ctx, types)
    return found.handler_set(request.check_order)


_FORGED = (
    "LACUNA_HANDLERS: the answer of the process that checks the handler plugins does not "
    "match LACUNA_HANDLERS (did a plugin write to its socket?)"
)


def _plugin_error(exc: BaseException) -> str:
    """``Type: message`` of what a plugin raised, secrets masked, control characters escaped,
    at most ``MAX_PLUGIN_ERROR_CHARS``. ``BaseException`` too: a ``SystemExit(0)`` from a
    plugin once ended ``serve`` at start with exit code 0, which the shipped systemd unit
    does not restart. Never raises (``redact.exception_text``): an exception whose
    ``__str__`` or whose metaclass's ``__name__`` raised printed a traceback and was
    reported as the plugin ending its process; a 50 MB message, as a garbled answer."""
    text = exception_text(exc, MAX_PLUGIN_ERROR_CHARS)
    return printable(redact_text(text))[:MAX_PLUGIN_ERROR_CHARS]


#: The most lines of one plugin's ``ConfigError`` a start keeps, and characters of each line.
MAX_PLUGIN_PROBLEMS = 20
MAX_PROBLEM_CHARS = 900


def plugin_problems(exc: ConfigError, item: str) -> list[str]:
    """The lines of a ``ConfigError`` that the plugin of ``item`` raised, as
    ``bounded_problems`` keeps them. Never raises; a ``problems`` that cannot be read, or
    none (``ConfigError([])`` left the handler out and ``serve`` started without it): one
    line naming ``item``."""
    try:
        problems: object = exc.problems
    except BaseException:
        problems = None
    return bounded_problems(problems) or [
        f"LACUNA_HANDLERS: the {item!r} handler failed to start: ConfigError: " + UNREADABLE_MESSAGE
    ]


def bounded_problems(problems: object, most: int = MAX_PLUGIN_PROBLEMS) -> list[str]:
    """Problem lines a plugin wrote (its ``ConfigError``'s, or an answer of the check
    process, which it can forge): at most ``most`` (then one saying more were left out),
    each a plain ``str`` of at most ``MAX_PROBLEM_CHARS``, secrets masked, control
    characters escaped; ``[]`` when ``problems`` is no collection of them. A plugin's 10 MB
    line was printed whole, and one over the check's 16 MiB frame reported as the plugin
    writing to its socket. Never raises."""
    if isinstance(problems, str):
        problems = [problems]
    lines: list[str] = []
    try:
        for problem in itertools.islice(problems, most + 1):  # type: ignore[call-overload]
            try:
                # str.__str__: the exact text, none of a str subclass's own methods.
                text = str.__str__(str(problem))[: 2 * MAX_PROBLEM_CHARS]
            except BaseException:
                text = UNREADABLE_MESSAGE
            lines.append(printable(mask_secrets(text))[:MAX_PROBLEM_CHARS])
    except BaseException:
        return []
    if len(lines) > most:
        lines[most:] = ["(more problems left out)"]
    return lines


def _plugin_value(value: object) -> str:
    """``repr(value)`` of something a plugin built, for a start problem: bounded, and
    ``(unreadable)`` when its ``__repr__`` raises."""
    text = value_text(value, MAX_PLUGIN_ERROR_CHARS + 1)
    return printable(redact_text(text))[:MAX_PLUGIN_ERROR_CHARS]


def check_after(after: Mapping[str, Sequence[str]]) -> list[str]:
    """Problems of the ``LACUNA_<NAME>_AFTER`` settings (SPEC §6): a name that is no
    configured instance, and each cycle (a handler after itself included), one line each."""
    problems = [
        f"LACUNA_{name.upper()}_AFTER names {other!r}, which is not an instance in "
        f"LACUNA_HANDLERS ({', '.join(after)})"
        for name, others in after.items()
        for other in others
        if other not in after
    ]
    if problems:
        return problems
    done: set[str] = set()
    for start in after:
        cycle = _cycle_from(start, after, [], done)
        if cycle is not None:
            return [
                f"LACUNA_{cycle[0].upper()}_AFTER: the handlers wait for each other in a cycle "
                f"({' -> '.join(cycle)}), so none would ever run"
            ]
    return []


def _cycle_from(
    name: str, after: Mapping[str, Sequence[str]], path: list[str], done: set[str]
) -> list[str] | None:
    """A depth-first walk of the AFTER graph: the first cycle met from ``name`` (its nodes,
    the first repeated at the end), or None; ``done`` holds names known to lead to none."""
    if name in path:
        return [*path[path.index(name) :], name]
    if name in done:
        return None
    path.append(name)
    for other in after[name]:
        cycle = _cycle_from(other, after, path, done)
        if cycle is not None:
            return cycle
    path.pop()
    done.add(name)
    return None


def _checked(problems: list[str], fallback: T, read: Callable[..., T], *args: Any) -> T:
    """``read(*args)``, or ``fallback`` with its ``ConfigError`` lines added to ``problems``."""
    try:
        return read(*args)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return fallback


def _instance_policy(ctx: HandlerContext, default: RetryPolicy, problems: list[str]) -> RetryPolicy:
    """The instance's retry schedule: each ``LACUNA_<NAME>_RETRY_*`` set overrides the
    global value (SPEC §6); a bad value, or a cap below the base delay, is added to
    ``problems`` (and the global value kept in its place)."""
    before = len(problems)
    policy = RetryPolicy(
        max_attempts=_checked(
            problems,
            default.max_attempts,
            int_setting,
            ctx,
            "RETRY_MAX_ATTEMPTS",
            default.max_attempts,
            MAX_RETRY_ATTEMPTS,
        ),
        base_delay_seconds=_checked(
            problems,
            default.base_delay_seconds,
            float_setting,
            ctx,
            "RETRY_BASE_DELAY",
            default.base_delay_seconds,
            MAX_DELAY_SECONDS,
            MIN_DELAY_SECONDS,
        ),
        max_delay_seconds=_checked(
            problems,
            default.max_delay_seconds,
            float_setting,
            ctx,
            "RETRY_MAX_DELAY",
            default.max_delay_seconds,
            MAX_DELAY_SECONDS,
        ),
    )
    if len(problems) == before and policy.max_delay_seconds < policy.base_delay_seconds:
        problems.append(
            f"{ctx.env_name('RETRY_MAX_DELAY')} ({policy.max_delay_seconds:g}) must not be "
            f"smaller than the {ctx.name} handler's retry base delay "
            f"({policy.base_delay_seconds:g})"
        )
        return default
    return policy


def _check_handler(item: str, handler: object) -> frozenset[str] | None:
    """The handler's default subscription; ``ConfigError`` (one line) unless ``handler`` has
    callable ``handle`` and ``aclose`` and an ``events`` that is ``None`` or a collection of
    event type strings. Checked at start: such a plugin once started, then failed every
    attempt, or (a bad ``events``) answered every webhook with a 500."""
    missing = [m for m in ("handle", "aclose") if not callable(getattr(handler, m, None))]
    if missing:
        raise ConfigError(
            f"LACUNA_HANDLERS: {item!r} built a {type(handler).__name__}, which is not a "
            f"handler: it has no {' or '.join(m + '()' for m in missing)} method "
            "(docs/plugins.md)"
        )
    return _declared_events(item, getattr(handler, "events", None))


def _declared_events(item: str, declared: object) -> frozenset[str] | None:
    """A handler's (or its factory's) own ``events`` as a filter: ``None`` or a collection of
    event type strings (a single string: that type), else ``ConfigError`` (one line)."""
    if declared is None:
        return None
    events = declared
    if isinstance(events, str | bytes) or not isinstance(events, Iterable):
        events = [events]  # refused below unless every item is a string
    types = list(events)
    if not all(isinstance(t, str) for t in types):
        raise ConfigError(
            f"LACUNA_HANDLERS: the {item!r} handler's events must be None or a set of event "
            f"type strings, got {_plugin_value(declared)}"
        )
    # Plain str: a subclass's own __hash__ or __lt__ would run wherever the filter is used.
    return frozenset(str.__str__(t) for t in types)


def _handler_timeout(name: str, environ: Mapping[str, str], default: float) -> float:
    """``LACUNA_<NAME>_TIMEOUT``, bounded as ``LACUNA_HANDLER_TIMEOUT`` is (its lease would
    overflow a timedelta and stop the dispatcher); ``default`` when unset."""
    var = f"LACUNA_{name.upper()}_TIMEOUT"
    raw = read_setting(environ, var)
    if raw is None or not raw.strip():
        return default
    try:
        return at_most(positive_float, MAX_TIMEOUT_SECONDS)(raw)
    except ValueError as exc:
        raise ConfigError(f"{var} {exc}") from None
