"""On a failed check, attach the journal of the units the test module names (``UNITS``);
the hook and the helpers live in ``molecule/shared/role_checks.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

from role_checks import pytest_runtest_makereport  # noqa: F401  (registers the hook)
