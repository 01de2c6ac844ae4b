"""The runtime package the role ships: exactly the tracked ``.py`` files and the operator page's
assets, reproducibly.

Drives the role's own controller-side step (``roles/smt_ingest/tasks/package_build.yml``) through
``ansible-playbook`` on localhost; that step only packs on the controller (no host changes), so it
is safe to run here. The tree always holds bytecode and an untracked file first, so the test cannot
pass because an earlier stage happened to leave the working tree clean.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import ANSIBLE_PLAYBOOK, REPO, run_playbook

PACK = REPO / "roles/smt_ingest/files/pack_runtime.py"
PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Pack through the role's own task file
      ansible.builtin.include_role:
        name: smt_ingest
        tasks_from: package_build.yml
    - name: Write down what was packed
      ansible.builtin.copy:
        content: "{{ _smt_ingest_package | to_json }}"
        dest: "{{ packed_json }}"
        mode: "0600"
"""


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True)


@pytest.fixture
def dirty_tree(tmp_path: Path) -> Path:
    """A git checkout of the package with bytecode and an untracked file in the work tree."""
    repo = tmp_path / "checkout"
    pkg = repo / "src" / "smt_droplet"
    shutil.copytree(REPO / "src" / "smt_droplet", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    _git(repo, "init", "-q")
    _git(repo, "add", "src")
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(pkg)], check=True, capture_output=True
    )
    (pkg / "scratch_notes.py").write_text("raise SystemExit('never shipped')\n")
    (pkg / "page_assets" / "page.js~").write_text("// an editor's backup: never shipped\n")
    assert any((pkg / "__pycache__").glob("*.pyc"))
    return pkg


def _members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return sorted(tar.getnames())


def _pack_with_role(pkg: Path, tmp_path: Path) -> dict[str, object]:
    book = tmp_path / "pack.yml"
    book.write_text(PLAYBOOK)
    out, _ = run_playbook(
        tmp_path,
        book,
        "-e",
        f"smt_ingest_package_src={pkg}",
        "-e",
        f"packed_json={tmp_path / 'packed.json'}",
        json_output=False,
        extra_env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((tmp_path / "packed.json").read_text())


@pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="ansible-playbook not in .venv")
def test_role_ships_only_tracked_sources(dirty_tree: Path, tmp_path: Path) -> None:
    packed = _pack_with_role(dirty_tree, tmp_path)
    src = REPO / "src/smt_droplet"
    assets = sorted(
        f"page_assets/{p.name}"
        for p in (src / "page_assets").iterdir()
        if p.suffix in (".html", ".js", ".css", ".svg")
    )
    assert assets == [f"page_assets/{n}" for n in ("icon.svg", "index.html", "page.css", "page.js")]
    tracked = sorted([*(p.name for p in src.glob("*.py")), *assets])
    assert _members(Path(str(packed["path"]))) == sorted(
        ["smt_droplet", "smt_droplet/page_assets", *(f"smt_droplet/{n}" for n in tracked)]
    )
    assert packed["files"] == tracked


def test_artifact_is_reproducible_and_follows_the_sources(dirty_tree: Path, tmp_path: Path) -> None:
    def pack() -> dict[str, str]:
        out = subprocess.run(
            [sys.executable, str(PACK), "--src", str(dirty_tree), "--out-dir", str(tmp_path)],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout)

    first = pack()
    os.utime(dirty_tree / "ledger.py", (1, 1))  # mtimes (a fresh clone) do not matter
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-f", str(dirty_tree)], check=True)
    assert pack()["sha256"] == first["sha256"]

    with (dirty_tree / "ledger.py").open("a") as fh:
        fh.write("# changed\n")
    second = pack()
    assert second["sha256"] != first["sha256"]
    assert second["build"] == f"{second['version']}+{second['sha256'][:12]}"
    with tarfile.open(second["path"]) as tar:
        member = tar.extractfile("smt_droplet/ledger.py")
        assert member is not None
        assert io.TextIOWrapper(member).read().endswith("# changed\n")
        assert {m.uid for m in tar.getmembers()} == {0}


def test_a_wheel_install_serves_the_operator_page(tmp_path: Path) -> None:
    """``pip install .`` (not editable) gives a working upload server: the page's assets are
    package data of the wheel."""
    import requests
    from serverproc import ServerProcess

    pytest.importorskip("pip", reason="this Python has no pip (the distribution's python3)")
    project = tmp_path / "project"  # a copy: no build/ or egg-info of an earlier build counts
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(project)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("smt_droplet-*.whl")
    target = tmp_path / "site"
    done = subprocess.run(
        [*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assets = sorted(p.name for p in (target / "smt_droplet" / "page_assets").iterdir())
    assert assets == ["icon.svg", "index.html", "page.css", "page.js"]
    (tmp_path / "inbox").mkdir()
    server = ServerProcess(
        "upload-server",
        {
            "SMT_LOCAL_DIR": str(tmp_path / "inbox"),
            "SMT_SPOOL_DIR": str(tmp_path / "spool"),
            "SMT_UPLOAD_STATE": str(tmp_path / "ratelimit.sqlite3"),
            "SMT_UPLOAD_BIND": "127.0.0.1",
            "SMT_UPLOAD_PORT": "0",
            "SMT_UPLOAD_TOKEN": "wheel-install-token-0123456789abcdef",
            "SMT_SHUTDOWN_GRACE": "1",
        },
        tmp_path / "upload-server.log",
        pythonpath=target,
    ).start()
    try:
        page = requests.get(server.url("/"), timeout=10)
        script = requests.get(server.url("/assets/page.js"), timeout=10)
    finally:
        server.ensure_stopped()
    assert page.status_code == 200 and "<title>" in page.text, page.text[:300]
    assert script.status_code == 200 and "use strict" in script.text
    assert str(target) in server.log() or "listening" in server.log()
