"""PGP-armored SMT deliveries: decrypt with ``gpg``, open the zip inside, extract the interval CSV.

SMT delivers many reports as ASCII-armored PGP messages (``*IntervalMeterUsage*.asc``,
``*DailyMeterUsage*.asc``, ``*.CSV.<n>.asc``) encrypted to the droplet's key; each decrypts to a
zip whose interval CSV is what gets posted. This module does only that unpacking; it posts
nothing and writes no ledger.

How the pass uses it (``process.py``): the ``.asc``'s digest is what the ledger is checked
against, so a delivery is decrypted once; on the app's 200 for the extracted CSV, the CSV's digest
is recorded first (the same interval CSV arriving later in plain text is then a no-op), then the
``.asc``'s; the file's own faults (:class:`DeliveryError` with ``retryable`` false) mark the
``.asc`` rejected with ``pgp:<code>: <reason>``, ours (gpg missing, timeout, locked key) are
retried by the next pass. Content decides, not the name: :func:`looks_armored` on the bytes the
pass already holds.

Settings (``config.PgpSettings.from_env``): ``SMT_GNUPG_HOME`` (default ``$GNUPGHOME`` or
``~/.gnupg`` of the service user), ``SMT_GNUPG_PASSPHRASE_FILE`` (optional; only for a
protected key, read at extraction time and handed to gpg through a pipe, never argv),
``SMT_PGP_MAX_BYTES`` (cap on the decrypted zip and on the sum of its uncompressed entries,
default 64 MiB), ``SMT_PGP_MAX_ENTRIES`` (default 64), ``SMT_GPG_TIMEOUT`` (seconds, default 120),
``SMT_PGP_TMPDIR`` (parent of the private plaintext directories; default ``$TMPDIR`` or ``/tmp``,
which the unit's ``PrivateTmp=`` makes private to the service).
The service unit needs write access to the GnuPG home (gpg-agent socket, trustdb); gpg-agent is
started on demand inside the unit's cgroup and ends with the oneshot service (it caches a given
passphrase for ``default-cache-ttl`` meanwhile). Keep the home path short or give the user a
``/run/user/<uid>``: the agent's socket path must fit in 108 bytes.

Why the ``gpg`` binary and not a binding: ``python3-gnupg`` is packaged (Debian 12: 0.4.9) but it
is itself a wrapper that runs ``gpg`` as a subprocess; calling it directly with ``--status-fd``
gives the same machine-readable status lines, one dependency less, and full control over the
flags (``--max-output``, ``--pinentry-mode loopback``, no dirmngr, no key retrieval).

Safety properties:

* no passphrase on any command line (``--passphrase-fd`` on a pipe); ``--pinentry-mode loopback``
  always, so gpg never launches a pinentry on a service;
* the ``.asc`` is read once into memory, hashed, and fed to gpg on stdin: the digest recorded is
  exactly the bytes that were decrypted;
* gpg's own ``--max-output`` caps the decrypted zip; the zip's central-directory entry count
  (counted from the raw bytes, before :mod:`zipfile` parses it) and declared sizes are capped;
  the chosen entry is capped again while it is read, since headers can lie;
* all plaintext (the zip, the CSV) lives in one ``mkdtemp`` directory (mode 0700), removed on
  every exit path of the context manager, including exceptions raised by the caller's body.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar

from .config import (
    DEFAULT_GPG_TIMEOUT,
    DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_PGP_MAX_ENTRIES,
    MAX_PASSPHRASE_BYTES,
    PgpSettings,
)

log = logging.getLogger("smt_droplet.pgp")

ARMOR_HEADER = b"-----BEGIN PGP MESSAGE-----"
_CHUNK = 1024 * 1024
_CENTRAL_HEADER_SIG = b"PK\x01\x02"
# Armored input is ~4/3 of the binary message; anything far beyond the zip cap is refused unread.
_ARMOR_OVERHEAD = 2


# ----------------------------------------------------------------------------------- errors


class DeliveryError(Exception):
    """A PGP delivery that could not be unpacked. ``code`` is the ledger's rejection reason.

    ``retryable`` is False for everything that is a property of the file (the pass marks it
    rejected until it changes or an operator runs ``forget``), True for trouble on our side.
    """

    code: ClassVar[str] = "pgp_error"
    retryable: ClassVar[bool] = False

    def __init__(self, file: Path | str, reason: str) -> None:
        self.file = Path(file)
        self.reason = reason
        super().__init__(f"{self.file.name}: {self.code}: {reason}")


class NoSecretKey(DeliveryError):
    """The droplet's keyring holds no secret key at all (key not imported)."""

    code = "no_secret_key"


class WrongKey(DeliveryError):
    """Encrypted to a key we don't have (or to a passphrase), so it cannot be decrypted here."""

    code = "wrong_key"


class CorruptArmor(DeliveryError):
    """Bad armor (CRC, base64, truncation), no OpenPGP data, a modified or unencrypted message."""

    code = "corrupt_armor"


class NotAZip(DeliveryError):
    """The decrypted payload is not a zip archive."""

    code = "not_a_zip"


class CorruptZip(NotAZip):
    """A zip, but damaged: bad CRC, truncated or password-protected entry, unknown method."""

    code = "corrupt_zip"


class NoCsvInside(DeliveryError):
    """The zip holds no ``*.csv`` entry."""

    code = "no_csv_inside"


class ZipTooLarge(DeliveryError):
    """Over the caps: decrypted size, entry count or uncompressed size (a zip bomb)."""

    code = "zip_too_large"


class DecryptFailed(DeliveryError):
    """gpg could not run or could not use our key (missing binary, timeout, bad passphrase).

    Not the file's fault: the pass should leave the file pending and retry later.
    """

    code = "decrypt_failed"
    retryable = True


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ExtractedCsv:
    """The interval CSV taken out of one delivery; valid only inside the ``with`` block."""

    source: Path  # the .asc file
    source_sha256: str  # digest of the .asc bytes that were decrypted
    member: str  # the entry name inside the zip, as stored
    path: Path  # the extracted CSV, in a private temporary directory
    csv_sha256: str
    size: int
    decryption_key: str | None = None  # fingerprint of the subkey gpg used (public information)
    members: tuple[str, ...] = field(default=())  # every entry name, for logs and status


# ------------------------------------------------------------------------------- public API


def extract(
    settings: PgpSettings,
    path: Path,
    workdir_parent: Path | None = None,
    *,
    armored: bytes | None = None,
) -> contextlib.AbstractContextManager[ExtractedCsv]:
    """:func:`extract_interval_csv` with ``settings`` (the passphrase read now, not earlier)."""
    return extract_interval_csv(
        path,
        settings.gnupg_home,
        workdir_parent or settings.tmp_dir,
        max_total_bytes=settings.max_total_bytes,
        max_entries=settings.max_entries,
        passphrase=settings.read_passphrase(),
        timeout=settings.timeout,
        gpg_binary=settings.gpg_binary,
        armored=armored,
    )


def looks_armored(data: bytes) -> bool:
    """True if ``data`` starts (after an optional BOM and whitespace) with a PGP message armor."""
    return data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip().startswith(ARMOR_HEADER)


@contextlib.contextmanager
def extract_interval_csv(
    path: Path,
    gnupg_home: Path | None,
    workdir_parent: Path | None = None,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_entries: int = DEFAULT_PGP_MAX_ENTRIES,
    passphrase: str | None = None,
    timeout: float = DEFAULT_GPG_TIMEOUT,
    gpg_binary: str = "gpg",
    armored: bytes | None = None,
) -> Iterator[ExtractedCsv]:
    """Decrypt ``path``, open the zip, yield the interval CSV; remove all plaintext on exit.

    Raises a :class:`DeliveryError` subclass naming the file and the reason. ``gnupg_home`` None
    means gpg's default (``$GNUPGHOME`` or ``~/.gnupg``). ``armored``: the file's bytes if the
    caller already read (and hashed) them; they are what gets decrypted and digested.
    """
    path = Path(path)
    workdir = Path(tempfile.mkdtemp(prefix="smt-pgp-", dir=workdir_parent))
    try:
        os.chmod(workdir, 0o700)
        armored, source_sha256 = _read_armored(path, max_total_bytes, armored)
        zip_path = workdir / "payload.zip"
        key = _gpg_decrypt(
            path,
            armored,
            zip_path,
            gnupg_home=gnupg_home,
            passphrase=passphrase,
            max_output=max_total_bytes,
            timeout=timeout,
            gpg_binary=gpg_binary,
        )
        del armored
        extracted = _extract_csv(path, zip_path, workdir, max_total_bytes, max_entries)
        zip_path.unlink()
        st = path.stat()
        os.utime(extracted.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        yield ExtractedCsv(
            source=path,
            source_sha256=source_sha256,
            member=extracted.member,
            path=extracted.path,
            csv_sha256=extracted.sha256,
            size=extracted.size,
            decryption_key=key,
            members=extracted.members,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():  # pragma: no cover - only on a filesystem error
            log.error("could not remove plaintext directory %s", workdir)


# ---------------------------------------------------------------------------------- decrypt


def _read_armored(path: Path, max_total_bytes: int, given: bytes | None) -> tuple[bytes, str]:
    cap = max_total_bytes * _ARMOR_OVERHEAD + 65536
    if given is not None:
        if len(given) > cap:
            raise ZipTooLarge(path, f"armored file is over {cap} bytes")
        return given, hashlib.sha256(given).hexdigest()
    try:
        with open(path, "rb") as fh:
            data = fh.read(cap + 1)
    except OSError as exc:
        raise DecryptFailed(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise ZipTooLarge(path, f"armored file is over {cap} bytes")
    return data, hashlib.sha256(data).hexdigest()


def _gpg_decrypt(
    path: Path,
    armored: bytes,
    out: Path,
    *,
    gnupg_home: Path | None,
    passphrase: str | None,
    max_output: int,
    timeout: float,
    gpg_binary: str,
) -> str | None:
    """Run gpg; return the fingerprint of the decryption subkey or raise a DeliveryError."""
    if gnupg_home is not None and not Path(gnupg_home).is_dir():
        raise DecryptFailed(path, f"GnuPG home {gnupg_home} is not a directory")
    with _passphrase_pipe(path, passphrase) as read_fd:
        cmd = _decrypt_command(gpg_binary, gnupg_home, max_output, out, read_fd)
        try:
            proc = subprocess.run(
                cmd,
                input=armored,
                capture_output=True,
                timeout=timeout,
                pass_fds=() if read_fd is None else (read_fd,),
                env=gpg_environment(),
                shell=False,
                check=False,
            )
        except FileNotFoundError:
            raise DecryptFailed(path, f"{gpg_binary} not found (install gnupg)") from None
        except subprocess.TimeoutExpired:
            raise DecryptFailed(path, f"gpg did not finish within {timeout:g} s") from None
    return _decryption_key(path, proc, gnupg_home, gpg_binary)


def gpg_environment() -> dict[str, str]:
    """What gpg (and the gpg-agent it starts) inherits: PATH, HOME and the C locale — never the
    pass's settings, so ADMIN_TOKEN does not live on in an agent process."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/nonexistent"),
        "LC_ALL": "C",
    }


def _decrypt_command(
    gpg_binary: str, gnupg_home: Path | None, max_output: int, out: Path, passphrase_fd: int | None
) -> list[str]:
    """gpg with machine-readable status, no network, no caches, capped output."""
    cmd = [gpg_binary, *_base_args(gnupg_home)]
    cmd += [
        "--status-fd",
        "1",
        "--no-auto-key-retrieve",
        "--no-auto-key-import",
        "--disable-dirmngr",
        "--no-symkey-cache",
        "--max-output",
        str(max_output),
    ]
    if passphrase_fd is not None:
        cmd += ["--passphrase-fd", str(passphrase_fd)]
    return [*cmd, "--output", str(out), "--decrypt"]


@contextlib.contextmanager
def _passphrase_pipe(path: Path, passphrase: str | None) -> Iterator[int | None]:
    """The read end of a pipe that holds the passphrase (never on a command line), or None."""
    if passphrase is None:
        yield None
        return
    secret = passphrase.encode()
    if len(secret) > MAX_PASSPHRASE_BYTES or b"\n" in secret:
        raise DecryptFailed(path, "passphrase is too long or spans lines")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, secret + b"\n")  # fits the pipe buffer; gpg reads it at its pace
    finally:
        os.close(write_fd)
    try:
        yield read_fd
    finally:
        os.close(read_fd)


def _decryption_key(
    path: Path,
    proc: subprocess.CompletedProcess[bytes],
    gnupg_home: Path | None,
    gpg_binary: str,
) -> str | None:
    status = _parse_status(proc.stdout)
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode == 0 and "DECRYPTION_OKAY" in status and "DECRYPTION_FAILED" not in status:
        if "BADMDC" in status:  # defensive: gpg exits non-zero for this already
            raise CorruptArmor(path, "integrity check failed: the message was modified")
        return status.get("DECRYPTION_KEY", [""])[0].split(" ")[0] or None
    raise _classify_failure(path, proc.returncode, status, stderr, gnupg_home, gpg_binary)


def _base_args(gnupg_home: Path | None) -> list[str]:
    args = ["--batch", "--yes", "--no-tty", "--pinentry-mode", "loopback"]
    if gnupg_home is not None:
        args += ["--homedir", str(gnupg_home)]
    return args


def _parse_status(raw: bytes) -> dict[str, list[str]]:
    """``[GNUPG:] KEYWORD args`` lines → {KEYWORD: [args, ...]}."""
    status: dict[str, list[str]] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        keyword, _, args = line[9:].partition(" ")
        status.setdefault(keyword, []).append(args)
    return status


def _last_gpg_message(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("gpg:")]
    return lines[-1][4:].strip() if lines else "gpg failed"


def _classify_failure(
    path: Path,
    returncode: int,
    status: dict[str, list[str]],
    stderr: str,
    gnupg_home: Path | None,
    gpg_binary: str,
) -> DeliveryError:
    message = _last_gpg_message(stderr)
    if "max-output" in stderr:
        return ZipTooLarge(path, "decrypted payload exceeds the size cap")
    if "BADMDC" in status:
        return CorruptArmor(path, "integrity check failed: the message was modified")
    recipients = [args.split(" ")[0] for args in status.get("ENC_TO", [])]
    missing = [args.split(" ")[0] for args in status.get("NO_SECKEY", [])]
    if recipients and missing and set(missing) >= set(recipients):
        ids = ", ".join(f"0x{r}" for r in recipients)
        ours = _secret_key_ids(gnupg_home, gpg_binary)
        if ours & {m.upper() for m in missing}:
            # gpg 2.4 reports NO_SECKEY for a key it holds but cannot unlock (no or wrong
            # passphrase): our problem, not the file's.
            return DecryptFailed(path, f"secret key for {ids} is locked: {message}")
        if ours:
            return WrongKey(path, f"encrypted to {ids}, which is not the droplet's key")
        return NoSecretKey(path, f"encrypted to {ids}; the keyring holds no secret key")
    if "NEED_PASSPHRASE_SYM" in status and not recipients:
        return WrongKey(path, "encrypted with a passphrase, not to the droplet's key")
    if recipients and ("NEED_PASSPHRASE" in status or "ERROR" in status):
        # We hold the key but could not use it: locked, wrong passphrase, agent trouble.
        return DecryptFailed(path, f"secret key unusable: {message}")
    if "NODATA" in status or "CRC error" in stderr or "armor" in stderr.lower():
        return CorruptArmor(path, message)
    if returncode == 0 and "DECRYPTION_OKAY" not in status:
        return CorruptArmor(path, "not an encrypted message (signed or stored only)")
    if not recipients:
        return CorruptArmor(path, message)
    return DecryptFailed(path, f"gpg exit {returncode}: {message}")


def _secret_key_ids(gnupg_home: Path | None, gpg_binary: str) -> set[str]:
    """Long key IDs (upper-case hex) of every secret key and subkey in the keyring."""
    cmd = [gpg_binary, *_base_args(gnupg_home), "--with-colons", "--list-secret-keys"]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, timeout=30, env=gpg_environment(), shell=False, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    ids = set()
    for line in proc.stdout.decode(errors="replace").splitlines():
        fields = line.split(":")
        if fields[0] in ("sec", "ssb") and len(fields) > 4 and fields[4]:
            ids.add(fields[4].upper())
    return ids


# -------------------------------------------------------------------------------------- zip


@dataclass(frozen=True)
class _Member:
    member: str
    path: Path
    sha256: str
    size: int
    members: tuple[str, ...]


def _count_central_headers(zip_path: Path) -> int:
    """Upper bound on what zipfile will parse: each central entry starts with PK\\x01\\x02."""
    count = 0
    tail = b""
    with open(zip_path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            buf = tail + chunk
            count += buf.count(_CENTRAL_HEADER_SIG)
            tail = buf[-(len(_CENTRAL_HEADER_SIG) - 1) :]
    return count


def _choose(infos: list[zipfile.ZipInfo]) -> zipfile.ZipInfo | None:
    csvs = [i for i in infos if not i.is_dir() and i.filename.lower().endswith(".csv")]
    for info in csvs:
        if "interval" in info.filename.lower():
            return info
    return csvs[0] if csvs else None


def _safe_name(member: str) -> str:
    name = PurePosixPath(member.replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable() and ch not in "\x00/")
    if name in ("", ".", "..") or not name.lower().endswith(".csv"):
        return "interval.csv"
    return name


def _extract_csv(
    path: Path, zip_path: Path, workdir: Path, max_total_bytes: int, max_entries: int
) -> _Member:
    if not zipfile.is_zipfile(zip_path):
        raise NotAZip(path, "the decrypted payload is not a zip archive")
    headers = _count_central_headers(zip_path)
    if headers > max_entries:
        raise ZipTooLarge(path, f"{headers} central-directory headers > cap {max_entries} entries")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise CorruptZip(path, f"cannot read the zip: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise ZipTooLarge(path, f"{len(infos)} entries > cap {max_entries}")
        declared = sum(i.file_size for i in infos)
        if declared > max_total_bytes:
            raise ZipTooLarge(
                path, f"uncompressed size {declared} bytes > cap {max_total_bytes} bytes"
            )
        names = tuple(i.filename for i in infos)
        info = _choose(infos)
        if info is None:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise NoCsvInside(path, f"no .csv entry among {len(names)} ({shown or 'empty zip'})")
        if info.flag_bits & 0x1:
            raise CorruptZip(path, f"entry {info.filename!r} is password-protected")
        dest = workdir / _safe_name(info.filename)
        limit = min(info.file_size, max_total_bytes)
        digest = hashlib.sha256()
        size = 0
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise ZipTooLarge(
                            path,
                            f"entry {info.filename!r} inflates past its declared "
                            f"{info.file_size} bytes (cap {max_total_bytes})",
                        )
                    digest.update(chunk)
                    out.write(chunk)
        except (
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            NotImplementedError,
            RuntimeError,
            ValueError,
        ) as exc:
            raise CorruptZip(path, f"entry {info.filename!r}: {exc}") from None
        if size != info.file_size:
            raise CorruptZip(
                path, f"entry {info.filename!r}: {size} bytes, header says {info.file_size}"
            )
    return _Member(info.filename, dest, digest.hexdigest(), size, names)
