"""The ``storage`` handler: copy every track of a finished job to a folder or an S3 bucket.

On ``job.completed`` it downloads each track's ``audio_url`` (through
``_http.OutboundClient``: https only, public addresses only, timeouts, bounded
redirects) and streams it to ``LACUNA_STORAGE_URL`` without holding a whole
file in memory. Layout under the folder or bucket prefix::

    {task_id}/{track_id}.{ext}     the audio (ext from the track's format, the URL or
                                   the Content-Type; ``bin`` when none is known)
    {task_id}/event.json           the event, and per stored track: file, size, sha256

Guarantees:

- nothing partial ever appears under a final name: a folder write goes to a
  hidden temporary file in the same directory, fsynced, then ``os.replace``d;
  an S3 write is one PUT or one multipart upload, which S3 makes visible only
  when complete;
- ``event.json`` is rewritten (atomically) as tracks are stored (after each of
  the first 20, then each time a tenth more are, ``manifest_due``; after the last,
  and when a track fails), so a retry skips the tracks already stored: a track
  listed there whose file is present with the recorded size (and, in a folder,
  the recorded sha256) is not fetched again;
- a file larger than ``LACUNA_STORAGE_MAX_BYTES`` is refused while streaming;
- in a folder, files are created with ``LACUNA_STORAGE_FILE_MODE`` (default
  ``0600``) and the folders this handler creates with the matching directory mode
  (``0700``), whatever the process umask: unreleased audio is not world-readable;
- task and track ids must *fully* match ``SAFE_SEGMENT`` (a trailing newline does
  not pass), so an id never becomes a surprising path or S3 key.

Outcomes: HTTP 404/410 from the audio host, a refused URL, a malformed event
or an oversized file is permanent; 5xx, 408, 429, timeouts and resets are
retried (``Retry-After`` honoured), and so is a 200 that is no audio (a page, an
empty body). S3 refusing the credentials, or a missing
bucket, is permanent (the settings are read once at start, so retrying with
them cannot succeed; retry dead deliveries after fixing them). Errors the
request itself causes are permanent too: a key obstore cannot parse, an S3
``InvalidArgument``/``KeyTooLongError``-style refusal, a file name the OS
refuses (``ENAMETOOLONG``, ``EINVAL``, ``EILSEQ``, ``EFBIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import httpx
import obstore
import orjson
import structlog
from obstore.exceptions import (
    BaseError as ObjectStoreError,
)
from obstore.exceptions import (
    InvalidPathError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnknownConfigurationKeyError,
)
from obstore.store import S3Store

from ..config import quoted
from ..errors import ConfigError, PermanentError, RateLimited, RetryLater
from ..events import JobCompleted, Track, is_job_completed, parse_event
from ..models import Event, json_default, parse_json
from ..redact import redact_text, redact_url
from ._common import Problems, int_setting, network_timeouts
from ._http import OutboundClient, retry_after_seconds, transport_failure
from .base import MAX_RESULT_BYTES, HandlerContext

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

logger = structlog.get_logger("lacuna_webhooks.handlers.storage")

DEFAULT_MAX_BYTES = 500 * 1024 * 1024
MAX_MAX_BYTES = 1024**4  # 1 TiB: far above any track; an extra digit or five is reported
CHUNK_BYTES = 256 * 1024
S3_PART_BYTES = 8 * 1024 * 1024
S3_MAX_KEY_BYTES = 1024  # an S3 object key, in UTF-8 bytes
MANIFEST = "event.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# Task and track ids become path segments: keep them to a safe, portable alphabet.
# Whole ids only: \A...\Z (`$` would also match before a trailing newline: "ok\n").
SAFE_SEGMENT = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
AUDIO_EXTENSIONS = frozenset({"mp3", "wav", "flac", "ogg", "oga", "opus", "m4a", "aac", "webm"})
CONTENT_TYPE_EXT = {
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/wav": "wav",
    "audio/wave": "wav",
    "audio/x-wav": "wav",
    "audio/vnd.wave": "wav",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/mp4": "m4a",
    "audio/x-m4a": "m4a",
    "audio/aac": "aac",
    "audio/webm": "webm",
}
EXT_CONTENT_TYPE = {ext: ctype for ctype, ext in reversed(CONTENT_TYPE_EXT.items())}
RETRYABLE_STATUSES = frozenset({408, 425, 429})
DEFAULT_FILE_MODE = 0o600
# OS errors that the name or content of what is written causes: retrying the same event
# cannot fix them (a full disk or a missing permission can be fixed meanwhile, so those retry).
INPUT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.EFBIG})
# S3 error codes that the request itself causes (a key, a header, a size): permanent.
S3_INPUT_CODES = frozenset(
    {
        "InvalidArgument",
        "InvalidRequest",
        "InvalidObjectName",
        "InvalidURI",
        "KeyTooLongError",
        "MalformedXML",
        "MetadataTooLarge",
        "EntityTooLarge",
        "InvalidBucketName",
        "InvalidDigest",
        "BadDigest",
        "InvalidStorageClass",
        "UnexpectedContent",
    }
)


class Sink(Protocol):
    """Where files go. Keys are ``task/file`` relative to the configured folder or prefix."""

    def location(self, key: str) -> str: ...

    async def read(self, key: str, *, limit: int) -> bytes | None: ...

    async def holds(self, key: str, *, size: int, sha256: str) -> bool: ...

    async def write_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, content_type: str
    ) -> None: ...

    async def write_bytes(self, key: str, data: bytes, *, content_type: str) -> None: ...


class FolderSink:
    """A local folder (``file:///abs/dir``). Writes: temporary name, fsync, ``os.replace``.

    Files are created with ``file_mode`` and the folders above them with the matching
    directory mode (each read bit gains its execute bit), whatever the process umask.
    """

    def __init__(self, root: Path, file_mode: int = DEFAULT_FILE_MODE) -> None:
        self.root = root
        self.file_mode = file_mode
        self.dir_mode = directory_mode(file_mode)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def location(self, key: str) -> str:
        return self._path(key).as_uri()

    async def read(self, key: str, *, limit: int) -> bytes | None:
        path = self._path(key)

        def read() -> bytes | None:
            try:
                with path.open("rb") as f:
                    return f.read(limit + 1)
            except FileNotFoundError:
                return None

        data = await asyncio.to_thread(read)
        if data is not None and len(data) > limit:
            raise PermanentError(f"{self.location(key)} is larger than {limit} bytes")
        return data

    async def holds(self, key: str, *, size: int, sha256: str) -> bool:
        """True when the file exists with this size and sha256 (hashed locally: cheap)."""
        path = self._path(key)

        def check() -> bool:
            try:
                if path.stat().st_size != size:
                    return False
                digest = hashlib.sha256()
                with path.open("rb") as f:
                    while block := f.read(1024 * 1024):
                        digest.update(block)
            except FileNotFoundError:
                return False
            return digest.hexdigest() == sha256

        return await asyncio.to_thread(check)

    async def write_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, content_type: str
    ) -> None:
        path = self._path(key)
        await asyncio.to_thread(make_dirs, self.root, path.parent, self.dir_mode)
        # Same directory as the target, so os.replace is an atomic rename; hidden and
        # suffixed so no tool mistakes it for a finished file.
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        f: IO[bytes] = await asyncio.to_thread(create_file, temp, self.file_mode)
        try:
            async for chunk in chunks:
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(_flush_and_close, f)
            await asyncio.to_thread(os.replace, temp, path)
            await asyncio.to_thread(_fsync_dir, path.parent)
        except BaseException:
            # close() flushes the buffer and can fail again (a full disk: ENOSPC): the
            # temporary file goes all the same, and the first error is the one raised.
            with contextlib.suppress(OSError):
                f.close()
            temp.unlink(missing_ok=True)
            raise

    async def write_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        async def one() -> AsyncIterator[bytes]:
            yield data

        await self.write_stream(key, one(), content_type=content_type)


def directory_mode(file_mode: int) -> int:
    """The folder mode matching a file mode: ``0o600`` -> ``0o700``, ``0o640`` -> ``0o750``."""
    return file_mode | ((file_mode & 0o444) >> 2)


def create_file(path: Path, mode: int) -> IO[bytes]:
    """A new file (never an existing one) with exactly ``mode``, whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have cleared bits the mode asks for
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def make_dirs(root: Path, folder: Path, mode: int) -> None:
    """Create ``folder`` and its missing parents below ``root``, each with exactly ``mode``."""
    missing: list[Path] = []
    current = folder
    while current != root and not current.is_dir():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode)
        except FileExistsError:
            continue  # created meanwhile by a concurrent write: keep its mode
        os.chmod(directory, mode)


def file_mode_setting(ctx: HandlerContext) -> int:
    """``LACUNA_<NAME>_FILE_MODE``: octal, owner read+write, no write for others; ``0600``."""
    var = ctx.env_name("FILE_MODE")
    raw = ctx.get("FILE_MODE")
    if raw is None:
        return DEFAULT_FILE_MODE
    text = raw.strip()
    # ASCII octal digits only: int(…, 8) also takes `0o600`, `+600`, `0_600` and other
    # scripts' digits (`٠٦٠٠` was 0600), which no mode is written as.
    if not re.fullmatch(r"[0-7]+", text, re.ASCII):
        raise ConfigError(f"{var} must be an octal file mode such as 0600, got {quoted(raw)}")
    mode = int(text, 8)
    if mode & ~0o666 or mode & 0o600 != 0o600 or mode & 0o002:
        raise ConfigError(
            f"{var} must give the owner read and write, nobody execute, and others no write "
            f"(0600, 0640, 0644, 0660), got {quoted(raw)}"
        )
    return mode


def _flush_and_close(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Sink:
    """An S3 (or S3-compatible) bucket and prefix, through obstore."""

    def __init__(self, store: S3Store, bucket: str, prefix: str) -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix

    def location(self, key: str) -> str:
        prefix = f"{self.prefix}/" if self.prefix else ""
        return f"s3://{self.bucket}/{prefix}{key}"

    def _check_key(self, key: str) -> None:
        """``PermanentError`` for an object key (prefix included) over S3's 1024 bytes: S3
        answers a HEAD for one with a bare 400, which obstore reports as a generic error, so
        such a key was retried at every attempt instead of refused once."""
        full = f"{self.prefix}/{key}" if self.prefix else key
        size = len(full.encode("utf-8", "surrogatepass"))
        if size > S3_MAX_KEY_BYTES:
            raise PermanentError(
                f"{self.location('')}: the object key for {key[:80]!r} is {size} bytes, more "
                f"than S3's {S3_MAX_KEY_BYTES} (shorten the prefix of LACUNA_STORAGE_URL)"
            )

    async def read(self, key: str, *, limit: int) -> bytes | None:
        with self._errors(key):
            try:
                meta = await obstore.head_async(self.store, key)
                if meta["size"] > limit:
                    raise PermanentError(f"{self.location(key)} is larger than {limit} bytes")
                result = await obstore.get_async(self.store, key)
                return bytes(await result.bytes_async())
            except (NotFoundError, FileNotFoundError):
                return None

    async def holds(self, key: str, *, size: int, sha256: str) -> bool:
        """True when the object exists with this size (its sha256 is the manifest's record)."""
        with self._errors(key):
            try:
                meta = await obstore.head_async(self.store, key)
            except (NotFoundError, FileNotFoundError):
                return False
        return meta["size"] == size

    async def write_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, content_type: str
    ) -> None:
        # A multipart upload is invisible until completed, and aborted when the
        # stream raises: the object appears whole or not at all.
        with self._errors(key):
            await obstore.put_async(
                self.store,
                key,
                chunks,
                attributes={"Content-Type": content_type},
                chunk_size=S3_PART_BYTES,
                max_concurrency=2,
            )

    async def write_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        with self._errors(key):
            await obstore.put_async(
                self.store,
                key,
                data,
                attributes={"Content-Type": content_type},
                use_multipart=False,
            )

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """An operation on the object ``key``: its key checked first (``_check_key``), then
        obstore's errors as ours: refused credentials and a missing bucket are permanent."""
        self._check_key(key)
        where = self.location("")
        try:
            yield
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise PermanentError(
                f"{where}: S3 refused the credentials (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY): {_s3_reason(exc)}"
            ) from None
        except (NotFoundError, FileNotFoundError) as exc:
            # Missing keys are handled by the callers; what is left is the bucket.
            raise PermanentError(f"{where}: the bucket does not exist: {_s3_reason(exc)}") from None
        except (
            InvalidPathError,
            NotSupportedError,
            UnknownConfigurationKeyError,
            ValueError,
            TypeError,
        ) as exc:
            # Input-shaped: the key, a header value or an option is refused before or by
            # S3; the same event gives the same request on every retry.
            raise PermanentError(f"{where}: S3 refused the request: {_s3_reason(exc)}") from None
        except ObjectStoreError as exc:
            reason = _s3_reason(exc)
            if _s3_code(exc) in S3_INPUT_CODES:
                raise PermanentError(f"{where}: S3 refused the request: {reason}") from None
            raise RetryLater(f"{where}: S3 request failed: {reason}") from None


def _s3_code(exc: BaseException) -> str | None:
    """The ``<Code>`` of S3's error reply quoted in ``exc``, if any."""
    code = re.search(r"<Code>([A-Za-z0-9]+)</Code>", str(exc))
    return code.group(1) if code else None


def _s3_reason(exc: BaseException) -> str:
    """The S3 error code when the reply carries one, else the first line, shortened."""
    text = str(exc)
    code = _s3_code(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    # Masked before it is cut: a secret cut in two is no longer recognised.
    first = redact_text(first.split(" - Server returned", 1)[0])
    reason = first if len(first) <= 300 else first[:299] + "…"
    return f"{code} ({reason})" if code else reason


def open_sink(ctx: HandlerContext) -> Sink:
    """Build the sink for ``LACUNA_STORAGE_URL``; raise ``ConfigError`` naming the variable."""
    var = ctx.env_name("URL")
    url = ctx.require("URL")
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"{var} must be file:///absolute/dir (no host), got {redact_url(url)!r}"
            )
        root = Path(unquote(parts.path))
        if not root.is_absolute() or not parts.path.startswith("/"):
            raise ConfigError(f"{var} must name an absolute folder: file:///abs/dir")
        if any(ord(c) < 32 or ord(c) == 127 for c in str(root)):
            # `%00` decoded: "the handler failed to start: ValueError: embedded null byte".
            raise ConfigError(f"{var} names a folder with a control character (a %00?)")
        file_mode = file_mode_setting(ctx)
        try:
            if not root.is_dir():
                # Only the folder itself gets our mode; parents above it are the operator's.
                root.parent.mkdir(parents=True, exist_ok=True)
                make_dirs(root.parent, root, directory_mode(file_mode))
        except OSError as exc:
            raise ConfigError(f"{var}: cannot create {root}: {exc.strerror}") from None
        if not root.is_dir():  # a file (an executable one passed the access check below)
            raise ConfigError(f"{var}: {root} is not a folder")
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"{var}: {root} is not writable")
        return FolderSink(root, file_mode)
    if parts.scheme == "s3":
        return _s3_sink(ctx, parts.netloc, parts.path.strip("/"))
    raise ConfigError(
        f"{var} must be file:///abs/dir or s3://bucket/prefix, got {redact_url(url)!r}"
    )


def _s3_sink(ctx: HandlerContext, bucket: str, prefix: str) -> S3Sink:
    env: Mapping[str, str] = ctx.environ

    def first(*values: str | None) -> str | None:
        for value in values:
            if value is not None and value.strip():
                return value.strip()
        return None

    if not bucket:
        raise ConfigError(f"{ctx.env_name('URL')} must name a bucket: s3://bucket/prefix")
    config: S3Config = {
        "region": first(ctx.get("S3_REGION"), env.get("AWS_REGION"), env.get("AWS_DEFAULT_REGION"))
        or "us-east-1"
    }
    client: ClientConfig = {}
    endpoint_var, endpoint = next(
        (
            (var, value.strip())
            for var, value in (
                (ctx.env_name("S3_ENDPOINT"), ctx.get("S3_ENDPOINT")),
                ("AWS_ENDPOINT_URL_S3", env.get("AWS_ENDPOINT_URL_S3")),
                ("AWS_ENDPOINT_URL", env.get("AWS_ENDPOINT_URL")),
            )
            if value is not None and value.strip()
        ),
        ("", None),
    )
    if endpoint:
        scheme = _check_endpoint(endpoint, endpoint_var)
        config["endpoint"] = endpoint.rstrip("/")
        # The endpoint is the operator's own choice (MinIO on a private network is normal),
        # so plain http is allowed when it is spelled out.
        client["allow_http"] = scheme == "http"
    key_id = first(env.get("AWS_ACCESS_KEY_ID"))
    secret = first(env.get("AWS_SECRET_ACCESS_KEY"))
    if bool(key_id) != bool(secret):
        raise ConfigError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together")
    if key_id and secret:
        config["access_key_id"] = key_id
        config["secret_access_key"] = secret
        token = first(env.get("AWS_SESSION_TOKEN"))
        if token:
            config["session_token"] = token
    connect_seconds, read_seconds = network_timeouts(ctx)
    client["connect_timeout"] = timedelta(seconds=connect_seconds)
    client["timeout"] = timedelta(seconds=ctx.timeout_seconds)
    # obstore retries on its own too; keep that short so our schedule stays in charge.
    retry: RetryConfig = {
        "max_retries": 2,
        "retry_timeout": timedelta(seconds=read_seconds),
    }
    try:
        store = S3Store(
            bucket, prefix=prefix or None, config=config, client_options=client, retry_config=retry
        )
    except (ObjectStoreError, ValueError) as exc:
        raise ConfigError(f"{ctx.env_name('URL')}: cannot configure S3: {exc}") from None
    return S3Sink(store, bucket, prefix)


def _check_endpoint(endpoint: str, var: str) -> str:
    """The scheme of an S3 endpoint URL; ``ConfigError`` naming ``var`` (URL shown redacted)
    unless it is ``http(s)://host[:port][/path]`` with a valid port and nothing else."""
    problem = None
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        problem, parts, port = "is not a valid URL", None, None
    if parts is not None:
        if parts.scheme not in ("http", "https"):
            problem = "must be an http:// or https:// URL"
        elif not parts.hostname or any(c.isspace() for c in endpoint):
            problem = "has no valid host"
        elif parts.username is not None or parts.password is not None:
            problem = "must not hold credentials (use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        elif parts.query or parts.fragment:
            problem = "must not have a query or fragment"
        elif port == 0:
            problem = "has an invalid port"
    if problem is not None or parts is None:
        raise ConfigError(f"{var} {problem}: {redact_url(endpoint)}")
    return parts.scheme


def _segment(value: str | None, what: str, event: Event) -> str:
    if value is None or not SAFE_SEGMENT.fullmatch(value) or ".." in value:
        raise PermanentError(
            f"event {event.id}: {what} {value!r} cannot be used as a file name "
            "(letters, digits, '.', '_', '-'; at most 128)"
        )
    return value


def _is_a_document(media_type: str) -> bool:
    """A media type (lowercase) that is a page, a document or an image, never audio:
    ``text/*``, ``image/*``, JSON, XML, PDF... Anything else (``audio/*``, ``video/*``,
    ``application/octet-stream``, none at all) is taken as the file."""
    return (
        media_type.startswith(_DOCUMENT_PREFIXES)
        or media_type in _DOCUMENT_TYPES
        or (media_type.endswith(("+json", "+xml")))
    )


#: Media types no audio file is served as: pages, documents, images (a CDN's placeholder).
#: A list of what to refuse, not of what to take: servers label audio in many ways
#: (``application/octet-stream``, ``application/x-download``, ``binary/octet-stream``).
_DOCUMENT_PREFIXES = ("text/", "image/", "font/", "multipart/", "message/")
_DOCUMENT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/pdf",
        "application/x-www-form-urlencoded",
    }
)


def _extension(track: Track, response: httpx.Response) -> str:
    candidates = [
        (track.format or "").lower(),
        PurePosixPath(response.url.path).suffix.lstrip(".").lower(),
    ]
    for candidate in candidates:
        if candidate in AUDIO_EXTENSIONS:
            return candidate
    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type in CONTENT_TYPE_EXT:
        return CONTENT_TYPE_EXT[content_type]
    return "bin"


def _manifest_entries(raw: bytes | None) -> dict[str, dict[str, Any]]:
    """Track id -> entry from an existing ``event.json``; anything malformed is ignored."""
    if raw is None:
        return {}
    try:
        doc = parse_json(raw)  # its "event" may hold a number beyond a double (1E+400)
    except ValueError:
        return {}
    tracks = doc.get("tracks") if isinstance(doc, dict) else None
    entries: dict[str, dict[str, Any]] = {}
    for entry in tracks if isinstance(tracks, list) else []:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("id"), str)
            and isinstance(entry.get("file"), str)
            and SAFE_SEGMENT.fullmatch(entry["file"])
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            entries[entry["id"]] = entry
    return entries


def bounded_result(location: str, tracks: list[dict[str, Any]]) -> dict[str, Any]:
    """The delivery's result, ``{"location", "tracks"}``, within ``MAX_RESULT_BYTES``: when
    every track does not fit (some 250 tracks with long ids), the first ones that do, and
    ``tracks_omitted``, the number left out (all of them are in ``{location}event.json``).
    Over the limit, the whole result was dropped, and the handlers after this one lost the
    location too."""
    result: dict[str, Any] = {"location": location, "tracks": tracks}
    if len(orjson.dumps(result)) <= MAX_RESULT_BYTES:
        return result
    # "tracks_omitted" with the largest count it can hold: the room left is a lower bound.
    room = MAX_RESULT_BYTES - len(
        orjson.dumps({"location": location, "tracks": [], "tracks_omitted": len(tracks)})
    )
    kept: list[dict[str, Any]] = []
    for track in tracks:
        room -= len(orjson.dumps(track)) + (1 if kept else 0)  # the comma before it
        if room < 0:
            break
        kept.append(track)
    return {"location": location, "tracks": kept, "tracks_omitted": len(tracks) - len(kept)}


def manifest_due(done: int, recorded: int) -> bool:
    """Whether ``event.json`` is to be written now that ``done`` tracks are stored, the last
    one written holding ``recorded``: after each of the first 20, then each time a tenth more
    are stored. Each write holds every track so far, so writing after every track was
    quadratic: a job of 1000 tiny tracks wrote 171 MB of records and took 20 s; now some 60
    writes. The last track and a failure always write (``handle``)."""
    return done - recorded >= max(1, recorded // 10)


class StorageHandler:
    """Copies the audio of every ``job.completed`` event to a folder or S3 (see the module)."""

    name = "storage"
    events: frozenset[str] | None = frozenset({"job.completed"})

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        problems = Problems()  # every bad setting at once, not the first
        sink = problems.read(lambda: open_sink(ctx))
        max_bytes = problems.read(
            lambda: int_setting(ctx, "MAX_BYTES", DEFAULT_MAX_BYTES, maximum=MAX_MAX_BYTES)
        )
        timeouts = problems.read(lambda: network_timeouts(ctx))
        problems.check()
        assert sink is not None
        assert max_bytes is not None
        assert timeouts is not None
        self.sink, self.max_bytes = sink, max_bytes
        # One lock per task whose record is being written (see _write_manifest); an entry
        # lives while its lock is held or awaited.
        self._manifest_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        connect_seconds, read_seconds = timeouts
        self.http = OutboundClient(
            allow_private=ctx.allow_private_urls,
            connect_timeout_seconds=connect_seconds,
            read_timeout_seconds=read_seconds,
        )

    async def handle(self, event: Event) -> dict[str, Any] | None:
        """Store the event's tracks; return the delivery's result (SPEC §6):
        ``{"location": <URL of the task's folder>, "tracks": [{"id", "url", "size",
        "sha256", "content_type"}]}`` in the event's track order, ``url`` being the
        stored file's ``file://`` or ``s3://`` URL. ``None`` for a skipped event. Kept within
        ``MAX_RESULT_BYTES`` (``bounded_result``): past some 250 tracks, the first ones and
        ``tracks_omitted``."""
        typed = parse_event(event)
        if not is_job_completed(typed):
            logger.info("handler.storage.skipped", event_id=event.id, event_type=event.type)
            return None
        completed: JobCompleted = typed
        task_id = _segment(completed.data.id, "data.id (task id)", event)
        seen: set[str] = set()
        for track in completed.data.tracks:
            _segment(track.id, "track id", event)
            if track.id in seen:
                raise PermanentError(f"event {event.id}: track id {track.id!r} appears twice")
            seen.add(track.id)
        manifest_key = f"{task_id}/{MANIFEST}"
        tracks = completed.data.tracks
        try:
            stored = _manifest_entries(await self.sink.read(manifest_key, limit=MAX_MANIFEST_BYTES))
            done: dict[str, dict[str, Any]] = {}
            recorded = 0  # how many of `done` the last event.json written holds
            try:
                for track in tracks:
                    entry = stored.get(track.id)
                    if entry is not None and await self.sink.holds(
                        f"{task_id}/{entry['file']}", size=entry["size"], sha256=entry["sha256"]
                    ):
                        logger.info(
                            "handler.storage.track_already_stored",
                            event_id=event.id,
                            task_id=task_id,
                            track_id=track.id,
                            location=self.sink.location(f"{task_id}/{entry['file']}"),
                        )
                    else:
                        entry = await self._store_track(event, task_id, track)
                    done[track.id] = entry
                    complete = len(done) == len(tracks)
                    if complete or manifest_due(len(done), recorded):
                        await self._write_manifest(event, task_id, tracks, done, complete)
                        recorded = len(done)
            except Exception:
                if recorded < len(done):
                    # What is stored stays recorded, so the retry does not fetch it again;
                    # the failure is what is raised, whatever this write comes to.
                    with contextlib.suppress(Exception):
                        await self._write_manifest(event, task_id, tracks, done, False)
                raise
        except OSError as exc:
            message = f"writing under {self.sink.location('')} failed: {exc}"
            if exc.errno in INPUT_ERRNOS:
                raise PermanentError(message) from None
            raise RetryLater(message) from None
        logger.info(
            "handler.storage.stored",
            event_id=event.id,
            task_id=task_id,
            tracks=len(done),
            location=self.sink.location(f"{task_id}/"),
        )
        folder = self.sink.location(f"{task_id}/")
        return bounded_result(
            # A folder's URL ends in "/" on both sinks (a Path drops it), so a client can join.
            folder if folder.endswith("/") else folder + "/",
            [
                {
                    "id": track.id,
                    "url": self.sink.location(f"{task_id}/{done[track.id]['file']}"),
                    "size": done[track.id]["size"],
                    "sha256": done[track.id]["sha256"],
                    "content_type": done[track.id].get("content_type")
                    or "application/octet-stream",
                }
                for track in completed.data.tracks
            ],
        )

    async def _store_track(self, event: Event, task_id: str, track: Track) -> dict[str, Any]:
        """Download one track and write it under its final name; return its manifest entry."""
        what = f"audio for track {track.id}"
        url = track.audio_url
        try:
            async with self.http.stream_get(
                url, what=what, headers={"accept-encoding": "identity"}
            ) as response:
                self._check_response(response, what, url)
                ext = _extension(track, response)
                file_name = f"{track.id}.{ext}"
                content_type = EXT_CONTENT_TYPE.get(ext, "application/octet-stream")
                digest = hashlib.sha256()
                size = 0

                async def chunks() -> AsyncIterator[bytes]:
                    nonlocal size
                    async for chunk in response.aiter_bytes(CHUNK_BYTES):
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise PermanentError(
                                f"{what} is larger than LACUNA_STORAGE_MAX_BYTES "
                                f"({self.max_bytes} bytes)"
                            )
                        digest.update(chunk)
                        yield chunk
                    if size == 0:
                        # Raised before the write ends: no file under the final name, the
                        # temporary one removed, a multipart upload aborted. Stored, an empty
                        # 200 (a CDN's glitch) marked the delivery done, and the real audio
                        # was lost once its link went stale, as with a page served as 200.
                        raise RetryLater(
                            f"{what}: HTTP 200 from {redact_url(url)} with an empty body, not audio"
                        )

                key = f"{task_id}/{file_name}"
                await self.sink.write_stream(key, chunks(), content_type=content_type)
        except httpx.HTTPError as exc:
            raise transport_failure(exc, what=f"downloading {what}", url=url) from None
        entry = {
            "id": track.id,
            "file": file_name,
            "size": size,
            "sha256": digest.hexdigest(),
            "content_type": content_type,
            "stored_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        logger.info(
            "handler.storage.track_stored",
            event_id=event.id,
            task_id=task_id,
            track_id=track.id,
            size=size,
            sha256=entry["sha256"],
            source=redact_url(url),
            location=self.sink.location(key),
        )
        return entry

    def _check_response(self, response: httpx.Response, what: str, url: str) -> None:
        status = response.status_code
        source = redact_url(url)
        if status == 200:
            media_type = response.headers.get("content-type", "").split(";", 1)[0].strip()
            if _is_a_document(media_type.lower()):
                # An error or login page with a 200 (a CDN, a proxy, an expired link's
                # landing page) was archived as the audio, and the delivery was done: the
                # real file lost for good once the link went stale.
                raise RetryLater(
                    f"{what}: HTTP 200 from {source} with Content-Type "
                    f"{media_type[:80]!r}, a document, not audio"
                )
            length = response.headers.get("content-length", "")
            if length.isascii() and length.isdigit() and int(length) > self.max_bytes:
                raise PermanentError(
                    f"{what} is {length} bytes, more than LACUNA_STORAGE_MAX_BYTES "
                    f"({self.max_bytes})"
                )
            return
        if status in (404, 410):
            raise PermanentError(f"{what} is gone: HTTP {status} from {source}")
        if status >= 500 or status in RETRYABLE_STATUSES:
            # A 429 is RateLimited: retried without spending the budget (docs/delivery.md).
            kind = RateLimited if status == 429 else RetryLater
            raise kind(
                f"{what}: HTTP {status} from {source}",
                delay_seconds=retry_after_seconds(
                    response.headers.get("retry-after"), date=response.headers.get("date")
                ),
            )
        raise PermanentError(f"{what}: unexpected HTTP {status} from {source}")

    async def _write_manifest(
        self,
        event: Event,
        task_id: str,
        tracks: tuple[Track, ...],
        done: Mapping[str, dict[str, Any]],
        complete: bool,
    ) -> None:
        """Rewrite the task's ``event.json``: this event's stored tracks, then those that
        another event of the task stored and this one does not list (the files stay; left
        out, a replay of that event fetched them again, from links that may have gone
        stale). Read again just before the write, under the task's lock: two events of one
        task stored at once each wrote the record as it was when they began, and the last
        write dropped the other's tracks."""
        key = f"{task_id}/{MANIFEST}"
        lock = self._manifest_locks.get(task_id)
        if lock is None:
            lock = self._manifest_locks[task_id] = asyncio.Lock()
        async with lock:
            listed = {t.id for t in tracks}
            current = _manifest_entries(await self.sink.read(key, limit=MAX_MANIFEST_BYTES))
            earlier = [entry for track_id, entry in current.items() if track_id not in listed]
            doc = {
                "task_id": task_id,
                "event_id": event.id,
                "complete": complete,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "tracks": [done[t.id] for t in tracks if t.id in done] + earlier,
                "event": event.payload,
            }
            await self.sink.write_bytes(
                key,
                # json_default: a number beyond a double is a Decimal in the payload.
                orjson.dumps(doc, default=json_default, option=orjson.OPT_INDENT_2),
                content_type="application/json",
            )

    async def aclose(self) -> None:
        await self.http.aclose()
