#!/usr/bin/env bash
# Create (or reuse) the MONAI Label virtual environment and run tests/label in it.
#
# monailabel 0.8.5 pins numpy<2 while the main environment runs numpy 2, so MONAI Label gets its own
# venv, built from requirements-label.txt plus the dependencies of '.[offline]'. monai-skipts itself
# is not installed there: the tests import it from this checkout (PYTHONPATH), so one venv serves any
# clone of the repository and is rebuilt only when requirements-label.txt or setup.py change.
#
#   SKIPTS_LABEL_VENV  venv path (default: ~/.cache/monai-skipts/venv-label-<hash of the requirements>)
#   PYTHON             interpreter to create it with (default: python3)
# Arguments go to pytest, e.g. `.ci/label_env.sh -x -k png`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
HASH="$(cat requirements-label.txt setup.py | sha256sum | cut -c1-12)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/monai-skipts"
VENV="${SKIPTS_LABEL_VENV:-$CACHE/venv-label-$HASH}"
PY="${PYTHON:-python3}"

pip_quiet() {  # pip, without the notes about this machine's local package folders
    "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one build at a time
if [ "$(cat "$VENV/.skipts-requirements" 2>/dev/null || true)" != "$HASH" ]; then
    start=$SECONDS
    echo "label_env: creating $VENV" >&2
    if [ -z "${SKIPTS_LABEL_VENV:-}" ]; then  # drop venvs of older requirements
        find "$CACHE" -maxdepth 1 -name 'venv-label-*' ! -name "venv-label-$HASH*" -exec rm -rf {} + 2>/dev/null || true
    fi
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    pip_quiet install -q --upgrade pip
    had_build=$([ -e build ] && echo 1 || true)
    pip_quiet install -q -r requirements-label.txt "$REPO[offline]"  # (its dependencies)
    pip_quiet uninstall -q -y monai-skipts
    [ -n "$had_build" ] || rm -rf build  # setuptools' in-tree build folder
    echo "$HASH" > "$VENV/.skipts-requirements"
    echo "label_env: installed in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1)" >&2
fi
flock -u 9

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" - <<'PY'
import monai, monailabel, numpy, pydicom, torch

import monai_skipts

print(f"label_env: monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}, "
      f"numpy {numpy.__version__}, pydicom {pydicom.__version__}; monai_skipts from {monai_skipts.__file__}")
PY
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/label "$@"
