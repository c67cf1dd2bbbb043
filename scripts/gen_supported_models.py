"""Write the README's supported-models table from the coverage test's list (tests/model_coverage.py),
so that the table says what tests/integration/test_model_coverage.py checks and cannot drift from it.

    python scripts/gen_supported_models.py          # rewrite the table in README.md
    python scripts/gen_supported_models.py --check  # fail if it is stale (tests/unit/test_supported_models.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.model_coverage import TABLE_BEGIN, TABLE_END, Architecture, table_rows  # noqa: E402

README = ROOT / "README.md"


def tested(arch: Architecture) -> str:
    if arch.refused is None:
        return "real services: prefill worker, KV push, paged decode; chunked prefill on a decode worker"
    return "`dopd up` on the model's directory"


def result(arch: Architecture) -> str:
    if arch.refused is None:
        return "exact (greedy-identical to transformers on both paths)"
    return f"refused at load, one line, exit 1: {arch.refused}"


def render(readme: str) -> str:
    """`readme` with the text between the table's markers made anew."""
    begin, end = readme.index(TABLE_BEGIN), readme.index(TABLE_END)
    table = "\n".join(table_rows(tested, result))
    return readme[:begin] + TABLE_BEGIN + "\n" + table + "\n" + readme[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    args = parser.parse_args()
    current = README.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md's supported-models table is stale: run python scripts/gen_supported_models.py")
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
