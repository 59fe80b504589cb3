"""Write every hostile case's exact request bytes to ``DIR/<name>.http``.

The corpus lives as code in hostile_corpus.py (deterministic, reviewable, no blobs);
this dumps it for replay outside pytest: ``nc 127.0.0.1 PORT < DIR/apng.http``.
Pauses of trickled cases are dropped. Run from tests/robustness with tests/ on
PYTHONPATH: ``PYTHONPATH=.. python make_corpus.py /tmp/corpus``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hostile_corpus import CASES


def main(out: str) -> int:
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        data = b"".join(p for p in case.build() if isinstance(p, bytes))
        (target / f"{case.name}.http").write_bytes(data)
    print(f"{len(CASES)} cases written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "corpus"))
