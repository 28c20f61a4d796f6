"""Set up mlxscan in .venv at the repository root, using nothing but python3.

    python3 scripts/bootstrap.py          # mlxscan, its runtime dependencies and the reference extra
                                          # (transformers, torch CPU, gguf) that `mlxscan verify` uses
    python3 scripts/bootstrap.py --test   # also pytest

Safe to run again: pip skips what is already installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", action="store_true", help="also install the test extra")
    args = parser.parse_args()
    if sys.version_info < (3, 10):
        sys.exit(f"mlxscan needs Python 3.10 or newer; this is {sys.version.split()[0]}")
    if not venv_python().exists():
        print(f"bootstrap: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    extra = "test" if args.test else "reference"
    target = f"{ROOT}[{extra}]"
    print(f"bootstrap: installing mlxscan[{extra}] into .venv "
          "(the first time takes several minutes)", flush=True)
    subprocess.run([str(venv_python()), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(venv_python()), "-m", "pip", "install", "--quiet", "-e", target], check=True)
    print("bootstrap: ready (.venv/bin/mlxscan)", flush=True)


if __name__ == "__main__":
    main()
