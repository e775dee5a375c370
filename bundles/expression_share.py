"""Print how much of each bundle config is Python in ``$`` expressions (run from the repo root):

    python bundles/expression_share.py                 # bundles/common/*.json
    python bundles/expression_share.py FILE.json ...

The share is the characters of the ``$...`` string values over the file's characters
(:func:`monai_skipts.bundle.expression_share`); tests/test_bundles.py keeps it at most 10 %
for every file in bundles/common/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from monai_skipts.bundle.checks import expression_share

COMMON = Path(__file__).resolve().parent / "common"


def main(argv: list[str]) -> int:
    files = argv or sorted(str(p) for p in COMMON.glob("*.json"))
    for f in files:
        expr, total = expression_share(f)
        print(f"{f}: {expr} of {total} characters in $ expressions ({100 * expr / max(total, 1):.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
