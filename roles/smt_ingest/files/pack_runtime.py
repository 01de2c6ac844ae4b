#!/usr/bin/env python3
"""Pack the runtime package into a reproducible tar on the controller; print what was packed.

    pack_runtime.py --src DIR [--out-dir DIR]

Ships exactly the package's tracked ``.py`` files and the operator page's assets
(``page_assets/*.html|js|css|svg``; ``git ls-files`` when DIR is inside a git work tree; otherwise
what lies in DIR), whatever else lies in the working tree:
no ``__pycache__``, no editor backups, no untracked scratch files. The tar is reproducible (sorted
names, fixed owner, mode and mtime), so the same sources give the same bytes and the same
sha256: the role copies it with a checksum and reinstalls only when the sources changed.

Prints one JSON object: ``{"path", "sha256", "version", "build", "files"}`` (``build`` is
``<version>+<sha256[:12]>``, what the server units carry so that a new package restarts them).
Standard library only (it runs on the controller's Python, which need not have the package's
dependencies).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "smt_droplet"
MTIME = 946684800  # 2000-01-01: fixed so that equal sources make an equal tar


ASSETS = "page_assets"  # the operator page's HTML, JS and CSS (smt_droplet/page.py)
ASSET_SUFFIXES = (".html", ".js", ".css", ".svg")


def _shipped(name: str) -> bool:
    """A ``.py`` file directly in the package, or one of the page's assets."""
    if "/" not in name:
        return name.endswith(".py")
    folder, _, rest = name.partition("/")
    return folder == ASSETS and "/" not in rest and rest.endswith(ASSET_SUFFIXES)


def tracked_sources(src: Path) -> list[Path]:
    """The package's files that git tracks (or all of them outside a git work tree)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "ls-files", "-z", "--", "*.py", f"{ASSETS}/*"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        found = [*src.glob("*.py"), *(src / ASSETS).glob("*")]
        return sorted(p for p in found if p.is_file() and _shipped(p.relative_to(src).as_posix()))
    names = [n for n in out.decode().split("\0") if n and _shipped(n)]
    return sorted(src / n for n in names if (src / n).is_file())


def package_version(init: Path) -> str:
    """``__version__`` from ``__init__.py``, read without importing the package."""
    for node in ast.parse(init.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    raise SystemExit(f"{init}: no __version__")


def build_tar(src: Path, files: list[Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for folder in (PACKAGE, f"{PACKAGE}/{ASSETS}"):
            directory = tarfile.TarInfo(folder)
            directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(directory)
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{PACKAGE}/{path.relative_to(src).as_posix()}")
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, type=Path, help="the package directory")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smt-droplet",
        help="where to write the tar (default: $XDG_CACHE_HOME/smt-droplet)",
    )
    args = parser.parse_args(argv)
    src: Path = args.src.resolve()
    if not (src / "__init__.py").is_file():
        print(f"{src}: not a Python package (no __init__.py)", file=sys.stderr)
        return 2
    files = tracked_sources(src)
    version = package_version(src / "__init__.py")
    data = build_tar(src, files)
    args.out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = args.out_dir / f"{PACKAGE}-{version}.tar"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)  # two plays packing at once never see a half-written tar
    json.dump(
        {
            "path": str(out),
            "sha256": hashlib.sha256(data).hexdigest(),
            "version": version,
            "build": f"{version}+{hashlib.sha256(data).hexdigest()[:12]}",
            "files": [p.relative_to(src).as_posix() for p in files],
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
