"""The maps a newcomer reads name everything there is: a module, playbook, role or Ansible
module added without a line in README.md / CONTRIBUTING.md fails here."""

from __future__ import annotations

from helpers import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
CONTRIBUTING = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")


def test_contributing_maps_every_module_of_the_package() -> None:
    modules = sorted(p.name for p in (REPO / "src" / "smt_droplet").glob("*.py"))
    missing = [name for name in modules if f"`{name}`" not in CONTRIBUTING]
    assert not missing, f"CONTRIBUTING.md's map lacks {missing}"


def test_readme_names_every_playbook_role_and_ansible_module() -> None:
    playbooks = sorted(p.name for p in (REPO / "playbooks").glob("*.yml"))
    roles = sorted(p.name for p in (REPO / "roles").iterdir() if (p / "tasks").is_dir())
    modules = sorted(p.stem for p in (REPO / "library").glob("*.py"))
    missing = [name for name in playbooks + roles + modules if f"`{name}`" not in README]
    assert not missing, f"README.md does not name {missing}"


def test_every_ansible_module_is_mocked_for_lint_and_documented_in_contributing() -> None:
    lint = (REPO / ".ansible-lint").read_text(encoding="utf-8")
    for module in sorted(p.stem for p in (REPO / "library").glob("*.py")):
        assert f"- {module}" in lint, f".ansible-lint mock_modules lacks {module}"
        assert f"`{module}`" in CONTRIBUTING, f"CONTRIBUTING.md does not name {module}"
