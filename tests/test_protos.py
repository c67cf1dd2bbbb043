"""The committed stubs in common/pb are exactly what scripts/gen_protos.py makes from protos/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_stub_has_type_stubs():
    pb = ROOT / "common" / "pb"
    for module in pb.glob("*_pb2.py"):
        assert module.with_suffix(".pyi").exists(), module.name
