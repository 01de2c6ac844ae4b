"""PGP deliveries against the real ``gpg``: throwaway keys made here, nothing committed."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import struct
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from pgp_keys import Keyring, encrypt_to, make_zip, new_keyring, run_gpg, stop_agents

from smt_droplet import pgp_delivery as pgp
from smt_droplet.config import ConfigError, PgpSettings
from testbed.smt_csv import generate_interval_csv

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg not installed")

ESIID = "10443720000000099"
MiB = 1024 * 1024


def smt_interval_csv(esiid: str = ESIID, days: int = 2) -> bytes:
    """A small CSV in SMT's interval layout (the test bed's generator)."""
    return generate_interval_csv(esiid, date(2025, 11, 1), days)


BILLING_CSV = b"ESIID,BILL_START,BILL_END,KWH\r\n'10443720000000099,10/1/2025,10/31/2025,812\r\n"


@dataclass(frozen=True)
class Homes:
    droplet: Keyring  # the droplet's unprotected key
    other: Keyring  # somebody else's key
    locked: Keyring  # a passphrase-protected droplet key
    empty: Path  # a GnuPG home with no keys at all
    root: Path


LOCKED_PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def homes() -> Iterator[Homes]:
    # Short path: gpg-agent's socket lives in the home and sun_path is 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="gpgt", dir="/tmp"))
    empty = root / "empty"
    empty.mkdir(mode=0o700)
    made = Homes(
        droplet=new_keyring(root, "droplet"),
        other=new_keyring(root, "other"),
        locked=new_keyring(root, "locked", LOCKED_PASSPHRASE),
        empty=empty,
        root=root,
    )
    try:
        yield made
    finally:
        stop_agents((made.droplet.home, made.other.home, made.locked.home, empty))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The parent of the private temp dirs; must be empty again after every case."""
    work = tmp_path / "work"
    work.mkdir()
    yield work
    assert list(work.iterdir()) == [], "plaintext left behind"


def write_asc(tmp_path: Path, name: str, armored: bytes) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    path = inbox / name
    path.write_bytes(armored)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    return path


# ------------------------------------------------------------------------------------ tests


def is_pgp_armored(path: Path) -> bool:
    """``looks_armored`` on a file's first kilobyte (False if it cannot be read)."""
    try:
        head = path.read_bytes()[:1024]
    except OSError:
        return False
    return pgp.looks_armored(head)


def test_is_pgp_armored(tmp_path: Path, homes: Homes) -> None:
    asc = write_asc(tmp_path, "a.asc", encrypt_to(homes.droplet, b"x"))
    bom = write_asc(tmp_path, "b.asc", b"\xef\xbb\xbf\r\n  " + asc.read_bytes())
    csv = write_asc(tmp_path, "c.csv", smt_interval_csv())
    empty = write_asc(tmp_path, "d.asc", b"")
    public_key = write_asc(tmp_path, "k.asc", run_gpg(homes.droplet.home, "--armor", "--export"))
    assert is_pgp_armored(asc)
    assert is_pgp_armored(bom)
    assert not is_pgp_armored(csv)
    assert not is_pgp_armored(empty)
    assert not is_pgp_armored(public_key)
    assert not is_pgp_armored(tmp_path / "missing.asc")


def test_extracts_the_interval_csv_not_the_billing_csv(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    interval = smt_interval_csv()
    member = f"reports/IntervalMeterUsage_{ESIID}_20251101.csv"
    payload = make_zip([("BillingData.csv", BILLING_CSV), (member, interval)])
    armored = encrypt_to(homes.droplet, payload)
    asc = write_asc(tmp_path, f"IntervalMeterUsage_{ESIID}_20251101.asc", armored)

    with pgp.extract_interval_csv(asc, homes.droplet.home, workdir) as got:
        assert got.path.read_bytes() == interval
        assert got.member == member
        assert got.path.name == f"IntervalMeterUsage_{ESIID}_20251101.csv"
        assert got.csv_sha256 == hashlib.sha256(interval).hexdigest()
        assert got.size == len(interval)
        assert got.source == asc
        assert got.source_sha256 == hashlib.sha256(armored).hexdigest()
        assert got.members == ("BillingData.csv", member)
        assert got.decryption_key is not None and len(got.decryption_key) == 40
        # private: the directory is 0700, the CSV 0600, nothing else (the zip) is left in it
        private = got.path.parent
        assert private.parent == workdir
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert stat.S_IMODE(got.path.stat().st_mode) == 0o600
        assert [p.name for p in private.iterdir()] == [got.path.name]
        assert got.path.stat().st_mtime == asc.stat().st_mtime  # captured_at = delivery time
    assert not got.path.exists()
    assert not private.exists()

    # The pass hands over the bytes it already hashed: those are what gets decrypted.
    assert pgp.looks_armored(armored)
    with pgp.extract_interval_csv(asc, homes.droplet.home, workdir, armored=armored) as again:
        assert again.source_sha256 == got.source_sha256
        assert again.csv_sha256 == got.csv_sha256
    other = encrypt_to(homes.droplet, make_zip([("interval.csv", b"a,b\n")]))
    with pgp.extract_interval_csv(asc, homes.droplet.home, workdir, armored=other) as third:
        assert third.source_sha256 == hashlib.sha256(other).hexdigest()
        assert third.path.read_bytes() == b"a,b\n"


def test_falls_back_to_the_first_csv_and_matches_case_insensitively(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    first = smt_interval_csv(days=1)
    payload = make_zip([("readme.txt", b"hi"), ("usage_a.CSV", first), ("usage_b.csv", b"b\n")])
    asc = write_asc(tmp_path, "x.CSV.1.asc", encrypt_to(homes.droplet, payload))
    with pgp.extract_interval_csv(asc, homes.droplet.home, workdir) as got:
        assert got.member == "usage_a.CSV"
        assert got.path.read_bytes() == first

    payload = make_zip([("a.csv", b"a\n"), ("DAILY/INTERVAL_Usage.Csv", first)])
    asc = write_asc(tmp_path, "y.asc", encrypt_to(homes.droplet, payload))
    with pgp.extract_interval_csv(asc, homes.droplet.home, workdir) as got:
        assert got.member == "DAILY/INTERVAL_Usage.Csv"


def test_member_name_cannot_escape_the_private_directory(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    payload = make_zip([("../../../../tmp/IntervalEvil.csv", b"a,b\n")])
    asc = write_asc(tmp_path, "evil.asc", encrypt_to(homes.droplet, payload))
    with pgp.extract_interval_csv(asc, homes.droplet.home, workdir) as got:
        assert got.path.parent.parent == workdir
        assert got.path.name == "IntervalEvil.csv"


def test_settings_from_env_and_passphrase_protected_key(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    pass_file = tmp_path / "passphrase"
    pass_file.write_text(LOCKED_PASSPHRASE + "\n")
    env = {
        "SMT_GNUPG_HOME": str(homes.locked.home),
        "SMT_GNUPG_PASSPHRASE_FILE": str(pass_file),
        "SMT_PGP_MAX_BYTES": str(8 * MiB),
        "SMT_PGP_MAX_ENTRIES": "10",
        "SMT_GPG_TIMEOUT": "30",
    }
    settings = PgpSettings.from_env(env)
    assert settings.gnupg_home == homes.locked.home
    assert (settings.max_total_bytes, settings.max_entries, settings.timeout) == (8 * MiB, 10, 30)
    assert LOCKED_PASSPHRASE not in repr(settings)

    interval = smt_interval_csv(days=1)
    asc = write_asc(
        tmp_path, "locked.asc", encrypt_to(homes.locked, make_zip([("interval.csv", interval)]))
    )
    # Locked key without / with the wrong passphrase: our problem, not the file's → retryable.
    # (Before any success: gpg-agent caches a passphrase once it has been given.)
    for passphrase in (None, "wrong"):
        with pytest.raises(pgp.DecryptFailed) as exc_info:
            with pgp.extract_interval_csv(
                asc, homes.locked.home, workdir, passphrase=passphrase, timeout=30
            ):
                pass
        assert exc_info.value.retryable
        assert exc_info.value.code == "decrypt_failed"

    with pgp.extract(settings, asc, workdir) as got:
        assert got.path.read_bytes() == interval

    # The passphrase never appears on a command line: run gpg through a wrapper that records
    # its argv, and check.
    argv_log = tmp_path / "argv"
    wrapper = tmp_path / "gpg-wrapper"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {argv_log}\nexec gpg "$@"\n')
    wrapper.chmod(0o755)
    with pgp.extract_interval_csv(
        asc, homes.locked.home, workdir, passphrase=LOCKED_PASSPHRASE, gpg_binary=str(wrapper)
    ) as got:
        assert got.path.read_bytes() == interval
    recorded = argv_log.read_text()
    assert "--passphrase-fd" in recorded
    assert LOCKED_PASSPHRASE not in recorded

    with pytest.raises(ConfigError):
        PgpSettings.from_env({"SMT_PGP_MAX_ENTRIES": "0"})
    default = PgpSettings.from_env({})
    assert default.gnupg_home == Path("~/.gnupg").expanduser()
    assert default.read_passphrase() is None


def test_encrypted_to_another_key_is_wrong_key(tmp_path: Path, homes: Homes, workdir: Path) -> None:
    payload = make_zip([("interval.csv", smt_interval_csv(days=1))])
    asc = write_asc(tmp_path, "other.asc", encrypt_to(homes.other, payload))
    with pytest.raises(pgp.WrongKey) as exc_info:
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir):
            pass
    err = exc_info.value
    assert err.file == asc
    assert err.code == "wrong_key"
    assert not err.retryable
    assert str(err).startswith("other.asc: wrong_key: encrypted to 0x")


def test_keyring_without_secret_key_is_no_secret_key(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    payload = make_zip([("interval.csv", smt_interval_csv(days=1))])
    asc = write_asc(tmp_path, "mine.asc", encrypt_to(homes.droplet, payload))
    with pytest.raises(pgp.NoSecretKey) as exc_info:
        with pgp.extract_interval_csv(asc, homes.empty, workdir):
            pass
    assert exc_info.value.code == "no_secret_key"
    assert isinstance(exc_info.value, pgp.DeliveryError)


def test_passphrase_encrypted_message_is_wrong_key(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    armored = run_gpg(
        homes.other.home,
        "--passphrase",
        "pw",
        "--pinentry-mode",
        "loopback",
        "--s2k-count",
        "65536",
        "--armor",
        "--symmetric",
        data=make_zip([("interval.csv", b"a\n")]),
    )
    asc = write_asc(tmp_path, "sym.asc", armored)
    with pytest.raises(pgp.WrongKey, match="passphrase"):
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir):
            pass


def _armor_body(armored: bytes) -> tuple[list[str], list[str], str]:
    lines = armored.decode().splitlines()
    body = [ln for ln in lines[1:-1] if ln and not ln.startswith("=")]
    crc = next(ln for ln in lines if ln.startswith("="))
    return lines, body, crc


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def _rearmor(raw: bytes) -> bytes:
    import base64

    b64 = base64.b64encode(raw).decode()
    body = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    crc = base64.b64encode(_crc24(raw).to_bytes(3, "big")).decode()
    text = "\n".join(["-----BEGIN PGP MESSAGE-----", "", *body, "=" + crc])
    return (text + "\n-----END PGP MESSAGE-----\n").encode()


def test_corrupt_armor_variants(tmp_path: Path, homes: Homes, workdir: Path) -> None:
    import base64

    payload = make_zip([("interval.csv", smt_interval_csv(days=1))])
    armored = encrypt_to(homes.droplet, payload)
    lines, body, _crc = _armor_body(armored)

    flipped = list(body[0])
    flipped[20] = "A" if flipped[20] != "A" else "B"
    raw = bytearray(base64.b64decode("".join(body)))
    raw[-5] ^= 0xFF  # inside the encrypted data, armor CRC recomputed: only the MDC notices

    cases = {
        "crc.asc": "\n".join([lines[0], "", "".join(flipped), *body[1:], *lines[-2:]]) + "\n",
        "truncated.asc": "\n".join(lines[:4]) + "\n",
        "garbage.asc": "-----BEGIN PGP MESSAGE-----\n\n!!not base64$$\n-----END PGP MESSAGE-----\n",
        "empty.asc": "-----BEGIN PGP MESSAGE-----\n\n-----END PGP MESSAGE-----\n",
        "tampered.asc": _rearmor(bytes(raw)).decode(),
        "signed-only.asc": run_gpg(homes.droplet.home, "--armor", "--sign", data=payload).decode(),
    }
    reasons = {}
    for name, text in cases.items():
        asc = write_asc(tmp_path, name, text.encode())
        assert is_pgp_armored(asc)
        with pytest.raises(pgp.CorruptArmor) as exc_info:
            with pgp.extract_interval_csv(asc, homes.droplet.home, workdir):
                pass
        assert exc_info.value.code == "corrupt_armor"
        reasons[name] = exc_info.value.reason
    assert "modified" in reasons["tampered.asc"]
    assert "not an encrypted message" in reasons["signed-only.asc"]


def test_payload_that_is_not_a_zip(tmp_path: Path, homes: Homes, workdir: Path) -> None:
    asc = write_asc(tmp_path, "plain.asc", encrypt_to(homes.droplet, smt_interval_csv(days=1)))
    with pytest.raises(pgp.NotAZip) as exc_info:
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir):
            pass
    assert exc_info.value.code == "not_a_zip"


def test_zip_without_a_csv(tmp_path: Path, homes: Homes, workdir: Path) -> None:
    payload = make_zip([("report.txt", b"hello"), ("data.xlsx", b"PK..."), ("csv/", b"")])
    asc = write_asc(tmp_path, "nocsv.asc", encrypt_to(homes.droplet, payload))
    with pytest.raises(pgp.NoCsvInside, match=r"report\.txt"):
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir):
            pass
    empty = write_asc(tmp_path, "emptyzip.asc", encrypt_to(homes.droplet, make_zip([])))
    with pytest.raises(pgp.NoCsvInside, match="empty zip"):
        with pgp.extract_interval_csv(empty, homes.droplet.home, workdir):
            pass


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """200 MB of zeros, deflated to ~200 KB, beside a small interval CSV."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("interval.csv", smt_interval_csv(days=1))
        zero = bytes(MiB)
        with zf.open("zeros.csv", "w") as entry:
            for _ in range(200):
                entry.write(zero)
    data = buf.getvalue()
    assert len(data) < 1 * MiB
    return data


def test_zip_bomb_is_refused_quickly(
    tmp_path: Path, homes: Homes, workdir: Path, zip_bomb: bytes
) -> None:
    asc = write_asc(tmp_path, "bomb.asc", encrypt_to(homes.droplet, zip_bomb))
    started = time.monotonic()
    with pytest.raises(pgp.ZipTooLarge, match="uncompressed size 2097") as exc_info:
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir):
            pass
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"took {elapsed:.2f} s: did it inflate the bomb?"
    assert exc_info.value.code == "zip_too_large"
    assert not exc_info.value.retryable


def _lying_zip(claimed: int, actual: int) -> bytes:
    """One deflated entry of ``actual`` zero bytes whose headers claim ``claimed`` bytes."""
    data = bytearray(make_zip([("interval.csv", bytes(actual))]))
    # local header: uncompressed size at offset 22; central header: at offset 24
    struct.pack_into("<I", data, 22, claimed)
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, claimed)
    return bytes(data)


def test_lying_headers_are_caught_while_reading(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    asc = write_asc(tmp_path, "liar.asc", encrypt_to(homes.droplet, _lying_zip(1000, 5 * MiB)))
    started = time.monotonic()
    with pytest.raises((pgp.CorruptZip, pgp.ZipTooLarge)) as exc_info:
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir, max_total_bytes=64 * 1024):
            pass
    assert time.monotonic() - started < 3.0
    assert not exc_info.value.retryable


def test_too_many_entries(tmp_path: Path, homes: Homes, workdir: Path) -> None:
    payload = make_zip([(f"f{i}.csv", b"a\n") for i in range(20)])
    asc = write_asc(tmp_path, "many.asc", encrypt_to(homes.droplet, payload))
    # Counted from the raw central-directory signatures, before zipfile parses (and allocates).
    with pytest.raises(pgp.ZipTooLarge, match="20 central-directory headers > cap 10"):
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir, max_entries=10):
            pass
    with pgp.extract_interval_csv(asc, homes.droplet.home, workdir, max_entries=20) as got:
        assert got.member == "f0.csv"


def test_decrypted_payload_over_the_cap_stopsrun_gpg(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    # Stored (not deflated) 1.3 MiB: gpg's --max-output cuts it off before zipfile sees it.
    payload = make_zip([("interval.csv", os.urandom(13 * MiB // 10))], method=zipfile.ZIP_STORED)
    asc = write_asc(tmp_path, "big.asc", encrypt_to(homes.droplet, payload))
    with pytest.raises(pgp.ZipTooLarge, match="decrypted payload"):
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir, max_total_bytes=MiB):
            pass


def test_password_protected_zip_entry(tmp_path: Path, homes: Homes, workdir: Path) -> None:
    data = bytearray(make_zip([("interval.csv", b"a,b\n")], method=zipfile.ZIP_STORED))
    struct.pack_into("<H", data, 6, 0x1)  # general purpose flag: encrypted (local header)
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<H", data, central + 8, 0x1)
    asc = write_asc(tmp_path, "pw.asc", encrypt_to(homes.droplet, bytes(data)))
    with pytest.raises(pgp.CorruptZip, match="password"):
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir):
            pass


def test_operational_failures_are_retryable(tmp_path: Path, homes: Homes, workdir: Path) -> None:
    asc = write_asc(tmp_path, "ok.asc", encrypt_to(homes.droplet, make_zip([("i.csv", b"a\n")])))
    with pytest.raises(pgp.DecryptFailed, match="not found") as exc_info:
        with pgp.extract_interval_csv(
            asc, homes.droplet.home, workdir, gpg_binary=str(tmp_path / "no-gpg")
        ):
            pass
    assert exc_info.value.retryable
    with pytest.raises(pgp.DecryptFailed, match="not a directory"):
        with pgp.extract_interval_csv(asc, tmp_path / "no-home", workdir):
            pass


def test_caller_exception_still_removes_the_plaintext(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    asc = write_asc(tmp_path, "ok.asc", encrypt_to(homes.droplet, make_zip([("i.csv", b"a\n")])))
    seen: list[Path] = []
    with pytest.raises(RuntimeError, match="post failed"):
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir) as got:
            seen.append(got.path)
            assert got.path.exists()
            raise RuntimeError("post failed")
    assert not seen[0].exists()


def test_armored_file_far_over_the_cap_is_not_read(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    asc = write_asc(tmp_path, "huge.asc", b"-----BEGIN PGP MESSAGE-----\n\n" + b"A" * (3 * MiB))
    with pytest.raises(pgp.ZipTooLarge, match="armored file"):
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir, max_total_bytes=MiB):
            pass


def test_pgp_compression_bomb_is_cut_off_by_max_output(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    # gpg compresses before encrypting: 32 MiB of zeros become an .asc of about a kilobyte.
    armored = encrypt_to(homes.droplet, bytes(32 * MiB))
    assert len(armored) < 64 * 1024
    asc = write_asc(tmp_path, "pgpbomb.asc", armored)
    started = time.monotonic()
    with pytest.raises(pgp.ZipTooLarge, match="decrypted payload"):
        with pgp.extract_interval_csv(asc, homes.droplet.home, workdir, max_total_bytes=MiB):
            pass
    assert time.monotonic() - started < 3.0


def test_message_for_several_recipients_including_ours(
    tmp_path: Path, homes: Homes, workdir: Path
) -> None:
    pub = run_gpg(homes.droplet.home, "--armor", "--export", homes.droplet.fingerprint)
    run_gpg(homes.other.home, "--import", data=pub)
    interval = smt_interval_csv(days=1)
    armored = run_gpg(
        homes.other.home,
        "--trust-model",
        "always",
        "--armor",
        "--recipient",
        homes.other.fingerprint,
        "--recipient",
        homes.droplet.fingerprint,
        "--encrypt",
        data=make_zip([("IntervalMeterUsage.csv", interval)]),
    )
    asc = write_asc(tmp_path, "both.asc", armored)
    with pgp.extract_interval_csv(asc, homes.droplet.home, workdir) as got:
        assert got.path.read_bytes() == interval
    # ...and neither recipient is ours: wrong key, naming both key ids.
    with pytest.raises(pgp.WrongKey) as exc_info:
        with pgp.extract_interval_csv(asc, homes.locked.home, workdir):
            pass
    assert exc_info.value.reason.count("0x") == 2
