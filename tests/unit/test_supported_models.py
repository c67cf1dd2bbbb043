"""The README's supported-models table is the coverage test's list (scripts/gen_supported_models.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_table_is_generated_from_the_coverage_list():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_supported_models.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
