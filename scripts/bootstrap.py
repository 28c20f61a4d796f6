"""Set up mlxscan in .venv at the repository root, using nothing but python3.

    python3 scripts/bootstrap.py          # mlxscan, its runtime dependencies and the reference extra
                                          # (transformers, torch CPU, gguf) that `mlxscan verify` uses
    python3 scripts/bootstrap.py --test   # also pytest, and Debian's chromium (the report's browser test)

Safe to run again: pip skips what is already installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def install_chromium() -> None:
    """Debian's chromium package, for the report's headless-browser test; only when /usr/bin/chromium is missing."""
    if Path("/usr/bin/chromium").exists():
        return
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        sys.exit("bootstrap: the tests need chromium and this system has no apt-get; install chromium "
                 "yourself (or set MLXSCAN_CHROMIUM to its path), then rerun")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and shutil.which("sudo") is None:
        sys.exit("bootstrap: installing chromium needs root (apt-get install chromium); rerun as root, or install it yourself")
    print("bootstrap: installing Debian's chromium for the report's browser test", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["update"], ["install", "-y", "chromium"]):
        if subprocess.run([*sudo, apt_get, "-q", *command], env=env).returncode != 0:
            sys.exit(f"bootstrap: `apt-get {' '.join(command)}` failed; install chromium yourself, then rerun")


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
    if args.test:
        install_chromium()
    print("bootstrap: ready (.venv/bin/mlxscan)", flush=True)


if __name__ == "__main__":
    main()
