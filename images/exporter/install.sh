#!/bin/sh
# Install `dvgt exporter` without torch: the requirements of the package's [exporter] extra, then the
# package itself without its dependencies. The exporter image runs this; tests/test_images.py runs
# the same steps in a fresh virtualenv.   usage: [PYTHON=python] sh install.sh SOURCE_DIR
set -eu
PYTHON="${PYTHON:-python}"
SOURCE="$1"
requirements="$(mktemp)"
"$PYTHON" - "$SOURCE/pyproject.toml" > "$requirements" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["exporter"]))
PY
"$PYTHON" -m pip install --no-cache-dir -r "$requirements"
"$PYTHON" -m pip install --no-cache-dir --no-deps "$SOURCE"
rm -f "$requirements"
