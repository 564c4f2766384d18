"""Run every benchmark in bench/ (each prints its own ratios). Used by `make bench`.

A benchmark is any bench/<name>.py with a main(); they run one after another
(never in parallel: each measures against a peer on the same cores).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SKIP = {"run_all.py", "bare_server.py", "__init__.py"}


def main() -> None:
    failed = []
    for path in sorted(HERE.glob("*.py")):
        if path.name in SKIP or path.name.startswith("_"):
            continue
        print(f"=== {path.stem} ===", flush=True)
        if subprocess.run([sys.executable, str(path), *sys.argv[1:]]).returncode != 0:
            failed.append(path.stem)
        print(flush=True)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
