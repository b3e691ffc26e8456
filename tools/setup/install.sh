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
#       git     official detectron2 main, compiled with its real C++/CUDA ops, from its git
#               repository (needs network access to it; use this on GPU machines) or, when D2_SRC
#               is set, from that source tree (e.g. `git archive` of main); non-editable (an
#               editable install of main fails with setuptools 84), with the constraints
#               tools/setup/constraints-d2main.txt on every pip call
#       present use a detectron2 already importable by $PYTHON (the venv sees its site-packages)
#   D2_SRC               git route only: a detectron2 source tree to build instead of the
#                        repository; it is copied first (the build writes into its tree), and
#                        rebuilt when its files change
#   MAX_JOBS             parallel compile jobs of the git route (default: the number of cores)
set -euo pipefail
D2_SRC=${D2_SRC:+$(cd "$D2_SRC" && pwd)}  # before the cd below, so a relative path works
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

if [ -n "$D2_SRC" ] && [ "$ROUTE" != git ]; then
  echo "setup: D2_SRC is for the git route only; set D2PRUNE_DETECTRON2=git as well." >&2; exit 2
fi
d2_src_digest=""
if [ -n "$D2_SRC" ]; then
  [ -f "$D2_SRC/setup.py" ] && [ -f "$D2_SRC/detectron2/__init__.py" ] || {
    echo "setup: D2_SRC=$D2_SRC is not a detectron2 source tree (no setup.py or detectron2/__init__.py)." >&2; exit 2; }
  [ -d "$D2_SRC/projects" ] || {  # setup.py installs PointRend and DeepLab from there
    echo "setup: D2_SRC=$D2_SRC has no projects/, which detectron2's setup.py installs from; export the whole tree (git archive HEAD)." >&2; exit 2; }
  d2_src_digest=$(cd "$D2_SRC" && find . -path ./.git -prune -o -type f -print0 | LC_ALL=C sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16)
fi

want="$ROUTE $(cat "$SETUP"/* pyproject.toml | sha256sum | cut -c1-16) $d2_src_digest"
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
case "$ROUTE" in
  sdist) CONSTRAINTS=(-c "$SETUP/constraints-d2v06.txt") ;;
  git) CONSTRAINTS=(-c "$SETUP/constraints-d2main.txt") ;;
  *) CONSTRAINTS=() ;;
esac
D2_SRC_STAMP="$VENV/.d2prune-d2src"  # the digest of the D2_SRC tree detectron2 was built from

echo "setup: torch and build tools"
"${PIP[@]}" "${CONSTRAINTS[@]}" -r "$SETUP/torch.txt" "setuptools>=77" wheel ninja

if "$PY" -c "import detectron2" 2>/dev/null \
   && { [ -z "$D2_SRC" ] || [ "$(cat "$D2_SRC_STAMP" 2>/dev/null)" = "$d2_src_digest" ]; }; then
  echo "setup: detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)') already importable, kept"
elif [ "$ROUTE" = present ]; then
  echo "setup: D2PRUNE_DETECTRON2=present but $PYTHON cannot import detectron2; install it or use sdist/git." >&2
  exit 1
elif [ "$ROUTE" = git ] && [ -n "$D2_SRC" ]; then
  echo "setup: detectron2 from $D2_SRC, with its C++ ops"
  build="$VENV/build/detectron2-src"
  rm -rf "$build" && mkdir -p "$build"
  (cd "$D2_SRC" && tar -c --exclude=./.git .) | tar -x -C "$build"
  d2_start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" "${CONSTRAINTS[@]}" --no-build-isolation "$build"
  echo "$d2_src_digest" > "$D2_SRC_STAMP"
  echo "setup: detectron2 built and installed in $(( $(date +%s) - d2_start )) s"
elif [ "$ROUTE" = git ]; then
  echo "setup: detectron2 main from its git repository"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" "${CONSTRAINTS[@]}" --no-build-isolation \
    "git+https://github.com/facebookresearch/detectron2.git"
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
