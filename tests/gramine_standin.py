"""Stand-in Gramine tools for tests (Gramine is not installed here).

They do what Gramine does with a manifest, without an enclave: `gramine-manifest` copies the
template (our placeholders sit inside strings, so a copy is a valid manifest for the stand-in),
`gramine-direct` / `gramine-sgx` record their arguments and run libos.entrypoint with loader.argv
and loader.env in fs.start_dir (host arguments are ignored, as in Gramine), and
`gramine-sgx-sign` records its arguments and writes the signature file.
"""

from __future__ import annotations

import sys
from pathlib import Path

MANIFEST_TOOL = """#!/bin/sh
echo "$@" >> "{log}"
cp "$1" "$2"
"""

LAUNCHER = """#!/bin/sh
printf '%s\\n' "$@" >> "{log}"
exec "{python}" -c '
import os, sys, tomllib
m = tomllib.load(open(sys.argv[1] + ".manifest", "rb"))
env = dict(os.environ)
env.update(m["loader"].get("env", {{}}))
os.chdir(m["fs"]["start_dir"])
os.execve(m["libos"]["entrypoint"], m["loader"]["argv"], env)
' "$1"
"""

SIGN = """#!/bin/sh
echo "$@" >> "{log}"
while [ $# -gt 0 ]; do
  if [ "$1" = "--output" ]; then echo signed > "$2"; fi
  shift
done
"""


def install_stand_ins(bin_dir: Path, logs: Path) -> Path:
    """Write the four stand-ins into ``bin_dir``; their logs go to ``logs/<tool>.log``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    scripts = {
        "gramine-manifest": MANIFEST_TOOL.format(log=logs / "manifest.log"),
        "gramine-direct": LAUNCHER.format(log=logs / "direct.log", python=sys.executable),
        "gramine-sgx": LAUNCHER.format(log=logs / "sgx.log", python=sys.executable),
        "gramine-sgx-sign": SIGN.format(log=logs / "sign.log"),
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir
