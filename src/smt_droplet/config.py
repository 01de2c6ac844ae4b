"""Typed settings built from the droplet's environment names.

Every command reads its settings through one of the ``*_settings`` functions below, from a plain
mapping (the process environment merged with the env file, see :mod:`smt_droplet.envfile`). A
missing or malformed value raises :class:`ConfigError` naming the variable, before any network
traffic; the CLI turns that into one log line and exit code 2.

Names are the seed deployment's (``ADMIN_TOKEN``, ``SMT_HOST``, ...) plus our own ``SMT_*``
additions. The Ansible modules take the same names in lower case and build the same dataclasses.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_INCLUDE = ("*.csv", "*.csv.*", "*DailyMeterUsage*.asc", "*IntervalMeterUsage*.asc")
DEFAULT_SPOOL_DIR = "/var/spool/smt-ingest"
LEDGER_BASENAME = ".posted_sha256"
ENCODINGS = ("base64+gzip", "base64")
DELIVERIES = ("inline", "raw-upload")  # the app's two endpoints (docs/intelliwatt-contract.md)
PULL_PATH = "/api/admin/smt/pull"
RAW_UPLOAD_PATH = "/api/admin/smt/raw-upload"
DEFAULT_WAITING_RETRY = 6 * 3600.0  # a file the app cannot place yet (HOME_ID_REQUIRED)
HOST_KEY_POLICIES = ("reject", "accept-new")
DEFAULT_LOCK_WAIT = 300.0
DEFAULT_STALE_AFTER = 3 * 3600.0
DEFAULT_NOTIFY_REPEAT = 6 * 3600.0
DEFAULT_NOTIFY_STATE = "/var/lib/smt-notify/sent.json"
DEFAULT_MAX_TOTAL_BYTES = 64 * 1024 * 1024  # a PGP delivery's zip and its entries, in all
DEFAULT_PGP_MAX_ENTRIES = 64
DEFAULT_GPG_TIMEOUT = 120.0
MAX_PASSPHRASE_BYTES = 4096
DEFAULT_MIN_FREE_MB = 0  # off unless set; the role sets 256 (smt_ingest_min_free_mb)
RETENTION_MODES = ("archive", "delete")
REMOTE_COMPLETIONS = ("none", "delete", "move")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class TargetError(ConfigError):
    """A command was pointed at a file or digest that is not there (exit 2, but not reported
    as a configuration error)."""


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def _require(env: Mapping[str, str], name: str) -> str:
    value = _get(env, name)
    if value is None:
        raise ConfigError(f"{name} is not set")
    return value


def _header_secret(name: str, value: str | None) -> str | None:
    """A token or secret that travels in an HTTP header: visible ASCII only. A non-latin-1
    character cannot be sent at all, and a newline or tab (a value copied with its line end)
    would fail every request; the error says where, never what."""
    if value is None:
        return None
    for position, ch in enumerate(value, start=1):
        if not ("!" <= ch <= "~"):
            kind = "a space or control character" if ord(ch) < 0x80 else "a non-ASCII character"
            raise ConfigError(
                f"{name} contains {kind} at position {position} of {len(value)}; "
                "tokens and secrets must be printable ASCII"
            )
    return value


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def _base_url(env: Mapping[str, str]) -> str:
    """``INTELLIWATT_BASE_URL``: https, or plain http to a loopback address (test doubles) or with
    ``SMT_ALLOW_HTTP=1`` (insecure: the admin token then crosses the network in clear)."""
    base_url = _require(env, "INTELLIWATT_BASE_URL")
    parsed = urllib.parse.urlsplit(base_url)
    if parsed.scheme == "https" and parsed.hostname:
        return base_url
    if parsed.scheme == "http" and parsed.hostname:
        if _loopback(parsed.hostname) or _flag(env, "SMT_ALLOW_HTTP"):
            return base_url
        raise ConfigError(
            f"INTELLIWATT_BASE_URL={base_url!r} is plain http to a non-loopback host: the admin "
            "token would travel in clear. Use https://, or set SMT_ALLOW_HTTP=1 deliberately"
        )
    raise ConfigError(f"INTELLIWATT_BASE_URL={base_url!r} must start with https://")


def _loopback(hostname: str) -> bool:
    return hostname in _LOOPBACK_HOSTS or hostname.startswith("127.")


def _notify_url(env: Mapping[str, str]) -> str | None:
    """``SMT_NOTIFY_URL``: https, or plain http to loopback (a local relay, the tests)."""
    url = _get(env, "SMT_NOTIFY_URL")
    if not url:
        return None
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https" and parsed.hostname:
        return url
    if parsed.scheme == "http" and parsed.hostname:
        if _loopback(parsed.hostname):
            return url
    raise ConfigError("SMT_NOTIFY_URL must be an https:// URL (plain http only to loopback)")


@dataclass(frozen=True)
class NotifySettings:
    """Where alerts go and how often the same one may be repeated (``smt-droplet notify``).

    ``SMT_NOTIFY_URL`` (a Slack/Discord incoming webhook or an ntfy server; a secret: never
    logged), ``SMT_NOTIFY_TOPIC`` (ntfy's topic, when the URL is the server's root),
    ``SMT_NOTIFY_SENDMAIL`` (an address: mail through the local ``sendmail``),
    ``SMT_NOTIFY_REPEAT`` (seconds before the same alert is sent again, default 21600),
    ``SMT_NOTIFY_STATE`` (what was sent when), and the ingest's ``SMT_SPOOL_DIR`` and
    ``SMT_STALE_AFTER``.
    """

    url: str | None = field(default=None, repr=False)
    topic: str | None = None
    mail_to: str | None = None
    repeat: float = DEFAULT_NOTIFY_REPEAT
    state: Path = Path(DEFAULT_NOTIFY_STATE)
    spool_dir: Path = Path(DEFAULT_SPOOL_DIR)
    stale_after: float = DEFAULT_STALE_AFTER
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NotifySettings:
        settings = cls(
            url=_notify_url(env),
            topic=_get(env, "SMT_NOTIFY_TOPIC"),
            mail_to=_get(env, "SMT_NOTIFY_SENDMAIL"),
            repeat=_float(env, "SMT_NOTIFY_REPEAT", DEFAULT_NOTIFY_REPEAT),
            state=Path(_get(env, "SMT_NOTIFY_STATE", DEFAULT_NOTIFY_STATE) or DEFAULT_NOTIFY_STATE),
            spool_dir=spool_dir(env),
            stale_after=RecordSettings.from_env(env).stale_after,
        )
        if settings.url is None and settings.mail_to is None:
            raise ConfigError("set SMT_NOTIFY_URL or SMT_NOTIFY_SENDMAIL: nowhere to send alerts")
        return settings


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (_get(env, name) or "").lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r} must be 1 or 0")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = _get(env, name, choices[0])
    assert value is not None
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def split_globs(raw: str | None) -> tuple[str, ...]:
    """``SMT_INCLUDE`` is a comma- or whitespace-separated list of globs."""
    if not raw:
        return DEFAULT_INCLUDE
    parts = [p for chunk in raw.split(",") for p in chunk.split()]
    return tuple(p for p in parts if p) or DEFAULT_INCLUDE


def _readable_file(name: str, path: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(f"{name}={path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{name}={path}: not readable by uid {os.getuid()}")
    return path


def spool_dir(env: Mapping[str, str]) -> Path:
    """The queue the webhook and the upload server write and the ingest pass consumes."""
    return Path(_get(env, "SMT_SPOOL_DIR", DEFAULT_SPOOL_DIR) or DEFAULT_SPOOL_DIR)


@dataclass(frozen=True)
class RecordSettings:
    """Where a pass leaves its record, and when the lack of a success is trouble.

    ``SMT_METRICS_DIR``: the node_exporter textfile directory ``smt_ingest.prom`` is written to
    (unset: no metrics file). ``SMT_STALE_AFTER``: seconds without a successful pass after which
    ``/health`` answers 503 and the staleness check alerts (default 10800, six timer passes).
    """

    spool_dir: Path
    metrics_dir: Path | None = None
    stale_after: float = DEFAULT_STALE_AFTER

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RecordSettings:
        metrics = _get(env, "SMT_METRICS_DIR")
        return cls(
            spool_dir=spool_dir(env),
            metrics_dir=Path(metrics) if metrics else None,
            stale_after=_float(env, "SMT_STALE_AFTER", DEFAULT_STALE_AFTER, minimum=60.0),
        )


def state_file(env: Mapping[str, str]) -> Path:
    """The ledger: ``STATE_FILE``, by default ``<SMT_LOCAL_DIR>/.posted_sha256``."""
    return Path(_get(env, "STATE_FILE") or Path(_require(env, "SMT_LOCAL_DIR")) / LEDGER_BASENAME)


def lock_wait(env: Mapping[str, str]) -> float:
    """``SMT_LOCK_WAIT``: seconds a pass waits for another one to finish (default 300)."""
    return _float(env, "SMT_LOCK_WAIT", DEFAULT_LOCK_WAIT)


def check_state_dir(path: Path) -> None:
    """Fail before any network traffic if the ledger cannot be written (exit 2): a POST the
    app accepted but we cannot record would be re-posted on every pass."""
    parent = Path(path).parent
    if Path(path).is_dir():
        raise ConfigError(f"STATE_FILE={path} is a directory; it must name the ledger file")
    if not parent.is_dir():
        raise ConfigError(f"STATE_FILE={path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (
        Path(path).exists() and not os.access(path, os.W_OK)
    ):
        raise ConfigError(f"STATE_FILE={path}: not writable by uid {os.getuid()}")


@dataclass(frozen=True)
class InboxSettings:
    """The inbox, its ledger and the pass lock (``status``, ``forget``, ``sync``)."""

    local_dir: Path
    state_file: Path
    include: tuple[str, ...] = DEFAULT_INCLUDE
    lock_wait: float = DEFAULT_LOCK_WAIT
    spool_dir: Path = Path(DEFAULT_SPOOL_DIR)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InboxSettings:
        return cls(
            local_dir=Path(_require(env, "SMT_LOCAL_DIR")),
            state_file=state_file(env),
            include=split_globs(_get(env, "SMT_INCLUDE")),
            lock_wait=lock_wait(env),
            spool_dir=spool_dir(env),
        )


@dataclass(frozen=True)
class PgpSettings:
    """Where the droplet's key lives and the caps that bound one delivery."""

    gnupg_home: Path | None = None
    passphrase_file: Path | None = None
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_entries: int = DEFAULT_PGP_MAX_ENTRIES
    timeout: float = DEFAULT_GPG_TIMEOUT
    gpg_binary: str = "gpg"
    tmp_dir: Path | None = None  # parent of the private plaintext directories; None: $TMPDIR

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PgpSettings:
        home = _get(env, "SMT_GNUPG_HOME") or _get(env, "GNUPGHOME")
        passphrase_file = _get(env, "SMT_GNUPG_PASSPHRASE_FILE")
        tmp_dir = _get(env, "SMT_PGP_TMPDIR")
        return cls(
            gnupg_home=Path(home).expanduser() if home else Path("~/.gnupg").expanduser(),
            passphrase_file=Path(passphrase_file) if passphrase_file else None,
            max_total_bytes=_int(env, "SMT_PGP_MAX_BYTES", DEFAULT_MAX_TOTAL_BYTES, minimum=1024),
            max_entries=_int(env, "SMT_PGP_MAX_ENTRIES", DEFAULT_PGP_MAX_ENTRIES, minimum=1),
            timeout=_float(env, "SMT_GPG_TIMEOUT", DEFAULT_GPG_TIMEOUT, minimum=1.0),
            tmp_dir=Path(tmp_dir) if tmp_dir else None,
        )

    def read_passphrase(self) -> str | None:
        """The key's passphrase from ``passphrase_file`` (first line), or None."""
        if self.passphrase_file is None:
            return None
        try:
            raw = self.passphrase_file.read_bytes()[:MAX_PASSPHRASE_BYTES]
        except OSError as exc:
            raise ConfigError(
                f"SMT_GNUPG_PASSPHRASE_FILE={self.passphrase_file}: {exc.strerror or exc}"
            ) from None
        return raw.decode("utf-8", "strict").splitlines()[0] if raw.strip() else None


@dataclass(frozen=True)
class SftpSettings:
    """Where and how to mirror SMT's SFTP drop (``smt_sftp_sync``)."""

    host: str
    user: str
    key: str
    remote_dir: str
    local_dir: Path
    port: int = 22
    known_hosts: str | None = None
    host_key_policy: str = "reject"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    min_age: float = 0.0
    connect_timeout: float = 20.0
    retries: int = 3
    max_depth: int = 2
    retry_base_delay: float = 1.0
    retry_max_delay: float = 30.0
    parallel: int = 4
    io_timeout: float = 60.0  # a connection silent this long mid-transfer counts as dropped
    inflight_bytes: int = 16 * 2**20  # SMT_SFTP_INFLIGHT_MB: READ bytes outstanding per file
    min_free_bytes: int = 0  # SMT_MIN_FREE_MB: below this, downloads stop (0: no guard)
    completion: str = "none"  # SMT_REMOTE_COMPLETION: what happens on SFTP once a file is posted
    completion_dir: str | None = None  # SMT_REMOTE_ARCHIVE_DIR, for completion "move"
    state_file: Path | None = None  # the ledger (retired files are not downloaded again)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SftpSettings:
        local_dir = Path(_require(env, "SMT_LOCAL_DIR"))
        remote_dir = _require(env, "SMT_REMOTE_DIR")
        completion, completion_dir = _remote_completion(env, remote_dir)
        key = _readable_file("SMT_KEY", _require(env, "SMT_KEY"))
        policy = _choice(env, "SMT_HOST_KEY_POLICY", HOST_KEY_POLICIES)
        known_hosts = _get(env, "SMT_KNOWN_HOSTS")
        if known_hosts is None and policy == "reject":
            raise ConfigError(
                "SMT_KNOWN_HOSTS is not set and SMT_HOST_KEY_POLICY=reject: pin SMT's host key "
                "(ssh-keyscan -p PORT HOST > known_hosts, check the fingerprint with SMT) "
                "or set SMT_HOST_KEY_POLICY=accept-new deliberately"
            )
        return cls(
            host=_require(env, "SMT_HOST"),
            user=_require(env, "SMT_USER"),
            key=key,
            remote_dir=remote_dir,
            local_dir=local_dir,
            port=_int(env, "SMT_PORT", 22, minimum=1),
            known_hosts=known_hosts,
            host_key_policy=policy,
            include=split_globs(_get(env, "SMT_INCLUDE")),
            min_age=_float(env, "SMT_MIN_AGE", 0.0),
            connect_timeout=_float(env, "SMT_CONNECT_TIMEOUT", 20.0, minimum=1.0),
            retries=_int(env, "SMT_SFTP_RETRIES", 3),
            retry_base_delay=_float(env, "SMT_RETRY_BASE_DELAY", 1.0),
            retry_max_delay=_float(env, "SMT_RETRY_MAX_DELAY", 30.0),
            parallel=_int(env, "SMT_SFTP_PARALLEL", 4, minimum=1),
            io_timeout=_float(env, "SMT_SFTP_IO_TIMEOUT", 60.0, minimum=0.1),
            inflight_bytes=_inflight_bytes(env),
            min_free_bytes=min_free_bytes(env),
            completion=completion,
            completion_dir=completion_dir,
            state_file=state_file(env),
        )


MAX_INFLIGHT_MB = 256


def _inflight_bytes(env: Mapping[str, str]) -> int:
    """``SMT_SFTP_INFLIGHT_MB`` (default 16): how much one download keeps requested ahead, i.e.
    the link's bandwidth-delay product (16 MB fills 1 Gbit/s at 128 ms round trip). It bounds
    memory too: a channel's SSH window is twice this (at least 64 MiB), and nothing more than
    the window can be buffered per channel."""
    value = _int(env, "SMT_SFTP_INFLIGHT_MB", 16, minimum=1)
    if value > MAX_INFLIGHT_MB:
        raise ConfigError(
            f"SMT_SFTP_INFLIGHT_MB={value} is above {MAX_INFLIGHT_MB} (the window that holds "
            "it is buffered per channel); a bandwidth-delay product that large is not a droplet's"
        )
    return value * 2**20


def min_free_bytes(env: Mapping[str, str]) -> int:
    """``SMT_MIN_FREE_MB`` (unset or 0: no guard; the role sets 256): the free space the inbox's
    file system keeps. Below it a pass downloads nothing more and the upload server answers 507; the
    same number for both, so neither fills the disk the other needs."""
    return _int(env, "SMT_MIN_FREE_MB", DEFAULT_MIN_FREE_MB) * 1024 * 1024


def _remote_completion(env: Mapping[str, str], remote_dir: str) -> tuple[str, str | None]:
    """``SMT_REMOTE_COMPLETION`` (``none``, ``delete``, ``move``) and, for ``move``,
    ``SMT_REMOTE_ARCHIVE_DIR``: an absolute remote directory outside ``SMT_REMOTE_DIR`` (inside
    it, the next listing would find the moved files again)."""
    completion = _choice(env, "SMT_REMOTE_COMPLETION", REMOTE_COMPLETIONS)
    target = _get(env, "SMT_REMOTE_ARCHIVE_DIR")
    if completion != "move":
        return completion, None
    if target is None or not target.startswith("/"):
        raise ConfigError(
            "SMT_REMOTE_COMPLETION=move needs SMT_REMOTE_ARCHIVE_DIR, an absolute remote directory"
        )
    target = "/" + target.strip("/")
    base = "/" + remote_dir.strip("/")
    if target == base or target.startswith(base.rstrip("/") + "/"):
        raise ConfigError(
            f"SMT_REMOTE_ARCHIVE_DIR={target} is inside SMT_REMOTE_DIR={remote_dir}: the next "
            "listing would find the moved files again"
        )
    return completion, target


@dataclass(frozen=True)
class LifecycleSettings:
    """What keeps the inbox and the ledger lean over years (:mod:`smt_droplet.retention`).

    ``SMT_RETENTION_DAYS``: posted files older than this leave the inbox (0, the default: they
    stay). ``SMT_RETENTION_MODE``: ``archive`` (gzip into ``SMT_ARCHIVE_DIR/YYYY-MM/``, default)
    or ``delete``. ``SMT_LEDGER_COPIES``: dated copies of the ledger kept beside it (0: none).
    """

    local_dir: Path
    state_file: Path
    retention_days: float = 0.0
    mode: str = "archive"
    archive_dir: Path | None = None
    ledger_copies: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LifecycleSettings:
        local_dir = Path(_require(env, "SMT_LOCAL_DIR"))
        days = _float(env, "SMT_RETENTION_DAYS", 0.0)
        if days != days or days == float("inf"):
            raise ConfigError("SMT_RETENTION_DAYS must be a finite number of days")
        mode = _choice(env, "SMT_RETENTION_MODE", RETENTION_MODES)
        archive = Path(_get(env, "SMT_ARCHIVE_DIR") or local_dir.parent / "smt_archive")
        if mode == "archive" and (archive == local_dir or local_dir in archive.parents):
            raise ConfigError(
                f"SMT_ARCHIVE_DIR={archive} is inside SMT_LOCAL_DIR: archives must live "
                "outside the inbox"
            )
        return cls(
            local_dir=local_dir,
            state_file=state_file(env),
            retention_days=days,
            mode=mode,
            archive_dir=archive if mode == "archive" else None,
            ledger_copies=_int(env, "SMT_LEDGER_COPIES", 0),
        )


@dataclass(frozen=True)
class PostSettings:
    """How to post inbox files to the web app (``smt_inline_post``)."""

    base_url: str
    admin_token: str = field(repr=False)
    local_dir: Path
    state_file: Path
    source: str = "adhocusage"
    esiid_default: str | None = None
    meter_default: str = "M1"
    encoding: str = "base64+gzip"
    max_body_bytes: int = 4_500_000
    http_timeout: float = 60.0
    retries: int = 3
    include: tuple[str, ...] = DEFAULT_INCLUDE
    retry_base_delay: float = 1.0
    retry_max_delay: float = 30.0
    retry_after_max: float = 60.0
    lock_wait: float = DEFAULT_LOCK_WAIT
    delivery: str = "inline"  # SMT_DELIVERY: inline (/pull) or raw-upload (the large-file path)
    waiting_retry: float = DEFAULT_WAITING_RETRY  # SMT_WAITING_RETRY_SECONDS

    @property
    def endpoint(self) -> str:
        path = RAW_UPLOAD_PATH if self.delivery == "raw-upload" else PULL_PATH
        return self.base_url.rstrip("/") + path

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PostSettings:
        return cls(
            base_url=_base_url(env),
            admin_token=_header_secret("ADMIN_TOKEN", _require(env, "ADMIN_TOKEN")) or "",
            local_dir=Path(_require(env, "SMT_LOCAL_DIR")),
            state_file=state_file(env),
            source=_get(env, "SOURCE_TAG", "adhocusage") or "adhocusage",
            esiid_default=_get(env, "ESIID_DEFAULT"),
            meter_default=_get(env, "METER_DEFAULT", "M1") or "M1",
            encoding=_choice(env, "SMT_ENCODING", ENCODINGS),
            max_body_bytes=_int(env, "SMT_MAX_BODY_BYTES", 4_500_000, minimum=1024),
            http_timeout=_float(env, "SMT_HTTP_TIMEOUT", 60.0, minimum=1.0),
            retries=_int(env, "SMT_POST_RETRIES", 3),
            include=split_globs(_get(env, "SMT_INCLUDE")),
            retry_base_delay=_float(env, "SMT_RETRY_BASE_DELAY", 1.0),
            retry_max_delay=_float(env, "SMT_RETRY_MAX_DELAY", 30.0),
            retry_after_max=_float(env, "SMT_RETRY_AFTER_MAX", 60.0),
            lock_wait=lock_wait(env),
            delivery=_choice(env, "SMT_DELIVERY", DELIVERIES),
            waiting_retry=_float(env, "SMT_WAITING_RETRY_SECONDS", DEFAULT_WAITING_RETRY),
        )


WEBHOOK_SECRET_NAMES = ("INTELLIWATT_WEBHOOK_SECRET", "DROPLET_WEBHOOK_SECRET")
DEFAULT_WEBHOOK_STATE = "/var/lib/smt-webhook/replay.sqlite3"
MAX_SIGNATURE_WINDOW = 300.0
SIGNATURE_MODES = ("off", "accept", "require")
UPLOAD_ROLES = ("admin", "customer")
DEFAULT_UPLOAD_STATE = "/var/lib/smt-upload/ratelimit.sqlite3"


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may hold of a server (``connguard.py``); the same for both servers."""

    header_timeout: float = 10.0  # SMT_HTTP_HEADER_TIMEOUT: a request header within this
    max_connections: int = 512  # SMT_HTTP_MAX_CONNECTIONS: open connections in total
    max_per_client: int = 64  # SMT_HTTP_MAX_PER_CLIENT: open connections per client address
    keepalive_timeout: float = 15.0  # SMT_HTTP_KEEPALIVE_TIMEOUT: an idle kept-alive connection

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConnectionLimits:
        limits = cls(
            header_timeout=_float(env, "SMT_HTTP_HEADER_TIMEOUT", 10.0, minimum=0.5),
            max_connections=_int(env, "SMT_HTTP_MAX_CONNECTIONS", 512, minimum=1),
            max_per_client=_int(env, "SMT_HTTP_MAX_PER_CLIENT", 64, minimum=1),
            keepalive_timeout=_float(env, "SMT_HTTP_KEEPALIVE_TIMEOUT", 15.0, minimum=0.5),
        )
        if limits.max_per_client > limits.max_connections:
            raise ConfigError("SMT_HTTP_MAX_PER_CLIENT is above SMT_HTTP_MAX_CONNECTIONS")
        return limits


def _bind(env: Mapping[str, str], name: str) -> str:
    value = _get(env, name, "0.0.0.0") or "0.0.0.0"  # noqa: S104 - a front door; UFW limits it
    if any(ch.isspace() for ch in value):
        raise ConfigError(f"{name}={value!r} is not an address")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default, minimum=0)  # 0 = any free port (tests)
    if value > 65535:
        raise ConfigError(f"{name}={value} is not a TCP port")
    return value


@dataclass(frozen=True)
class WebhookSettings:
    """``smt-droplet webhook-server``: ``POST /trigger/smt-now`` queues an ingest pass."""

    secret: str = field(repr=False)
    spool_dir: Path
    stale_after: float = DEFAULT_STALE_AFTER  # SMT_STALE_AFTER: /health degrades
    bind: str = "0.0.0.0"  # noqa: S104
    port: int = 8787
    max_queued: int = 20
    retry_after: int = 30
    max_body_bytes: int = 64 * 1024
    body_timeout: float = 10.0  # SMT_WEBHOOK_BODY_TIMEOUT: the whole body within this
    signature: str = "off"
    signature_window: float = 300.0
    shutdown_grace: float = 10.0
    previous_secret: str | None = field(default=None, repr=False)  # valid too while rotating
    state_file: Path = Path(DEFAULT_WEBHOOK_STATE)  # deliveries seen (replay memory)
    limits: ConnectionLimits = ConnectionLimits()

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secrets a signature may be made with (the current one first)."""
        return (self.secret,) + ((self.previous_secret,) if self.previous_secret else ())

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WebhookSettings:
        secret = None
        for name in WEBHOOK_SECRET_NAMES:
            secret = _header_secret(name, _get(env, name))
            if secret is not None:
                break
        if secret is None:
            raise ConfigError(
                "INTELLIWATT_WEBHOOK_SECRET (alias DROPLET_WEBHOOK_SECRET) is not set or empty: "
                "the webhook refuses to start without a secret"
            )
        return cls(
            secret=secret,
            spool_dir=spool_dir(env),
            stale_after=RecordSettings.from_env(env).stale_after,
            bind=_bind(env, "SMT_WEBHOOK_BIND"),
            port=_port(env, "SMT_WEBHOOK_PORT", 8787),
            max_queued=_int(env, "SMT_WEBHOOK_MAX_QUEUED", 20, minimum=1),
            retry_after=_int(env, "SMT_WEBHOOK_RETRY_AFTER", 30, minimum=1),
            body_timeout=_float(env, "SMT_WEBHOOK_BODY_TIMEOUT", 10.0, minimum=0.5),
            signature=_choice(env, "SMT_WEBHOOK_SIGNATURE", SIGNATURE_MODES),
            signature_window=_signature_window(env),
            shutdown_grace=_float(env, "SMT_SHUTDOWN_GRACE", 10.0),
            previous_secret=_header_secret(
                "INTELLIWATT_WEBHOOK_SECRET_PREVIOUS",
                _get(env, "INTELLIWATT_WEBHOOK_SECRET_PREVIOUS"),
            ),
            state_file=Path(_get(env, "SMT_WEBHOOK_STATE", DEFAULT_WEBHOOK_STATE) or ""),
            limits=ConnectionLimits.from_env(env),
        )


def _signature_window(env: Mapping[str, str]) -> float:
    window = _float(env, "SMT_WEBHOOK_SIGNATURE_WINDOW", MAX_SIGNATURE_WINDOW, minimum=1.0)
    if window > MAX_SIGNATURE_WINDOW:
        raise ConfigError(
            f"SMT_WEBHOOK_SIGNATURE_WINDOW={window:g} is above {MAX_SIGNATURE_WINDOW:g} seconds: "
            "a longer window makes captured requests replayable for longer"
        )
    return window


@dataclass(frozen=True)
class UploadSettings:
    """``smt-droplet upload-server``: ``POST /upload`` stores a CSV and queues an ingest pass."""

    inbox: Path
    spool_dir: Path
    state_db: Path
    state_file: Path
    stale_after: float = DEFAULT_STALE_AFTER  # SMT_STALE_AFTER: /health degrades
    token: str | None = field(default=None, repr=False)
    bind: str = "0.0.0.0"  # noqa: S104
    port: int = 8080
    max_bytes: int = 25 * 1024 * 1024
    admin_limit: int = 50
    admin_window: float = 24 * 3600.0
    customer_limit: int = 5
    customer_window: float = 30 * 24 * 3600.0
    default_role: str = "admin"
    cors_origin: str | None = None
    body_timeout: float = 600.0
    shutdown_grace: float = 10.0
    limits: ConnectionLimits = ConnectionLimits()
    ticket_secrets: tuple[str, ...] = field(default=(), repr=False)  # current, then previous
    client_daily_limit: int = 200  # uploads per client address per day, whoever they are
    max_concurrent: int = 16  # SMT_UPLOAD_MAX_CONCURRENT: uploads in flight at once, all clients
    min_free_bytes: int = 0  # SMT_MIN_FREE_MB: below this the server answers 507

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> UploadSettings:
        inbox = Path(_require(env, "SMT_LOCAL_DIR"))
        cors = _get(env, "SMT_UPLOAD_CORS_ORIGIN")
        if cors is not None and not cors.startswith(("https://", "http://")):
            raise ConfigError(
                f"SMT_UPLOAD_CORS_ORIGIN={cors!r} must be an origin like https://host"
            )
        role = _get(env, "SMT_UPLOAD_DEFAULT_ROLE", "admin") or "admin"
        if role not in UPLOAD_ROLES:
            raise ConfigError(f"SMT_UPLOAD_DEFAULT_ROLE={role!r} must be one of admin, customer")
        return cls(
            inbox=inbox,
            spool_dir=spool_dir(env),
            stale_after=RecordSettings.from_env(env).stale_after,
            state_db=Path(_get(env, "SMT_UPLOAD_STATE", DEFAULT_UPLOAD_STATE) or ""),
            state_file=state_file(env),
            token=_header_secret("SMT_UPLOAD_TOKEN", _get(env, "SMT_UPLOAD_TOKEN")),
            bind=_bind(env, "SMT_UPLOAD_BIND"),
            port=_port(env, "SMT_UPLOAD_PORT", 8080),
            max_bytes=_int(env, "SMT_UPLOAD_MAX_BYTES", 25 * 1024 * 1024, minimum=1),
            admin_limit=_int(env, "SMT_ADMIN_UPLOAD_DAILY_LIMIT", 50),
            admin_window=_float(env, "SMT_ADMIN_UPLOAD_WINDOW_SECONDS", 24 * 3600.0, minimum=1.0),
            customer_limit=_int(env, "SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT", 5),
            customer_window=_float(
                env, "SMT_CUSTOMER_UPLOAD_WINDOW_SECONDS", 30 * 24 * 3600.0, minimum=1.0
            ),
            default_role=role,
            cors_origin=cors.rstrip("/") if cors else None,
            body_timeout=_float(env, "SMT_UPLOAD_BODY_TIMEOUT", 600.0, minimum=1.0),
            shutdown_grace=_float(env, "SMT_SHUTDOWN_GRACE", 10.0),
            limits=ConnectionLimits.from_env(env),
            ticket_secrets=tuple(
                secret
                for name in ("SMT_UPLOAD_TICKET_SECRET", "SMT_UPLOAD_TICKET_SECRET_PREVIOUS")
                if (secret := _header_secret(name, _get(env, name)))
            ),
            client_daily_limit=_int(env, "SMT_UPLOAD_CLIENT_DAILY_LIMIT", 200, minimum=1),
            max_concurrent=_int(env, "SMT_UPLOAD_MAX_CONCURRENT", 16, minimum=1),
            min_free_bytes=min_free_bytes(env),
        )
