#!/usr/bin/env bash
# Creates the project's virtual environment and installs torch, detectron2 and d2prune into it.
# Idempotent: a stamp records the inputs of the last successful run, so a second run is instant.
#
# Environment:
#   VENV                 where to create it (default .venv)
#   PYTHON               interpreter to create it with (default python3.11)
#   D2PRUNE_DETECTRON2   how to get detectron2:
#       sdist   (default) detectron2 v0.6 from its source distribution, pinned by sha256, built
#               with a stub C++ extension and the constraints v0.6 needs (CPU, works offline
#               from the package index alone)
#       git     official detectron2 main from its git repository, compiled with its real C++/CUDA
#               ops (needs network access to the repository; use this on GPU machines)
#       present use a detectron2 already importable by $PYTHON (the venv sees its site-packages)
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
ROUTE=${D2PRUNE_DETECTRON2:-sdist}
SETUP=tools/setup
STAMP="$VENV/.d2prune-setup"

case "$ROUTE" in
  sdist|git|present) ;;
  *) echo "setup: D2PRUNE_DETECTRON2='$ROUTE' is not a route; use sdist, git or present." >&2; exit 2 ;;
esac

want="$ROUTE $(cat "$SETUP"/* pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: $VENV is up to date ($ROUTE)"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $PYTHON"
  if [ "$ROUTE" = present ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --progress-bar off --disable-pip-version-check)
CONSTRAINTS=()
[ "$ROUTE" = sdist ] && CONSTRAINTS=(-c "$SETUP/constraints-d2v06.txt")

echo "setup: torch and build tools"
"${PIP[@]}" "${CONSTRAINTS[@]}" -r "$SETUP/torch.txt" "setuptools>=77" wheel ninja

if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "setup: detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)') already importable, kept"
elif [ "$ROUTE" = present ]; then
  echo "setup: D2PRUNE_DETECTRON2=present but $PYTHON cannot import detectron2; install it or use sdist/git." >&2
  exit 1
elif [ "$ROUTE" = git ]; then
  echo "setup: detectron2 main from its git repository"
  "${PIP[@]}" --no-build-isolation "git+https://github.com/facebookresearch/detectron2.git"
else
  echo "setup: detectron2 v0.6 from its source distribution, with a stub extension"
  build="$VENV/build/detectron2"
  rm -rf "$build" && mkdir -p "$build"
  "$PY" -m pip download --progress-bar off --disable-pip-version-check --no-deps \
    --no-build-isolation --require-hashes -r "$SETUP/detectron2-sdist.txt" -d "$build"
  tar -xzf "$build"/*.tar.gz -C "$build"
  src=$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n 1)
  mkdir -p "$src/detectron2/layers/csrc"
  cp "$SETUP/stub_C.cpp" "$src/detectron2/layers/csrc/vision.cpp"
  MAX_JOBS=2 "${PIP[@]}" "${CONSTRAINTS[@]}" --no-build-isolation "$src"
fi

echo "setup: d2prune (editable) with its test extras"
"${PIP[@]}" "${CONSTRAINTS[@]}" -e ".[test]"

"$PY" -c "import torch, detectron2, d2prune; print('setup: torch', torch.__version__, '| detectron2', detectron2.__version__, '| d2prune', d2prune.__version__)"
echo "$want" > "$STAMP"
echo "setup: done in $(( $(date +%s) - start )) s"
