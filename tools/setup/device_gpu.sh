#!/usr/bin/env bash
# d2prune on a machine with one CUDA GPU and no network: the CUDA tests (tests/test_cuda.py), then
# the GPU latency benchmark of pruned R50-FPN Faster R-CNNs (tools/benchmark_gpu.py).
#
#   bash tools/setup/device_gpu.sh                     # run, from the repository root
#   D2_SRC=DIR bash tools/setup/device_gpu.sh --prepare # fill .devwheels/ and .devd2/ (networked)
#
# Run mode expects python3 (3.12) with torch + CUDA, torchvision, numpy, Pillow, opencv, tabulate,
# pyyaml, cloudpickle, portalocker, pytest, matplotlib, scipy and tqdm installed, and two folders
# beside the working tree (git-ignored through .git/info/exclude, so they travel only when carried):
#   .devwheels/  wheels of what that machine lacks: fvcore, iopath, yacs, pycocotools (cp312),
#                omegaconf, hydra-core, antlr4-python3-runtime, termcolor; installed into $SITE
#   .devd2/detectron2/  detectron2 main's source tree, used uncompiled from PYTHONPATH: its
#                Faster R-CNN needs no C++/CUDA extension (ROIAlign and NMS come from torchvision;
#                detectron2._C only serves rotated boxes, deformable convs and the fast COCOeval,
#                for which detectron2 falls back or fails only when used)
# DEVICE, SIDE, BATCHES, DTYPES, REPEATS, WARMUP, TEST_TIMEOUT and BENCH_TIMEOUT override the
# benchmark's settings (DEVICE=cpu SIDE=256 BATCHES=1 DTYPES=fp32 REPEATS=2 WARMUP=1: a dry run).
# Everything printed goes to $OUT/log.txt (OUT defaults to output/gpu), with the benchmark's
# $OUT/benchmark_gpu.md and .json and the tests' $OUT/test_cuda.xml. Expected 3-5 minutes on an
# H200 (install seconds, tests under a minute, benchmark 2-4 minutes); the timeouts (tests 120 s,
# benchmark 300 s, which writes its report after every setting) keep it under 8 minutes.
#
# Prepare mode (a machine with network access and git; any Python 3 with pip) downloads the
# wheels for CPython 3.12 on manylinux x86_64, builds the sdist-only pure-Python ones, and
# exports detectron2 from D2_SRC (a git repository, bare or not: its HEAD; or a plain source
# tree) without docs, demos, projects, datasets, tests and configs (about 3 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.devwheels}
D2=.devd2/detectron2

# Pinned: what detectron2 main and d2prune import, as the GPU machine lacks it.
BINARY_WHEELS=(
  "pycocotools==2.0.10"
  "yacs==0.1.8"
  "iopath==0.1.9"
  "omegaconf==2.3.0"
  "hydra-core==1.3.2"
  "termcolor==3.1.0"
)
SDIST_ONLY=(  # pure Python, published as source only: built into wheels here
  "fvcore==0.1.5.post20221221"
  "antlr4-python3-runtime==4.9.3"
)

prepare() {
  : "${D2_SRC:?set D2_SRC to a detectron2 git repository or source tree}"
  mkdir -p "$WHEELS"
  "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHEELS" "${BINARY_WHEELS[@]}"
  "$PYTHON" -m pip wheel --disable-pip-version-check --no-deps -w "$WHEELS" "${SDIST_ONLY[@]}"

  rm -rf "$D2" && mkdir -p "$D2"
  if git -C "$D2_SRC" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$D2_SRC" archive HEAD | tar -x -C "$D2"
    git -C "$D2_SRC" rev-parse HEAD > .devd2/REVISION
  else
    (cd "$D2_SRC" && tar -c --exclude=.git .) | tar -x -C "$D2"
    echo "copied from $D2_SRC" > .devd2/REVISION
  fi
  (cd "$D2" && rm -rf docs demo projects datasets tests dev docker configs tools .github)
  test -f "$D2/detectron2/modeling/meta_arch/rcnn.py" || { echo "prepare: $D2_SRC is not detectron2" >&2; exit 1; }

  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  for path in /.devwheels/ /.devd2/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"
  done
  ls -1 "$WHEELS"
  echo "detectron2 $(cat .devd2/REVISION)"
  du -sh "$WHEELS" .devd2
}

run() {
  local start rc_tests rc_bench
  start=$(date +%s)
  for path in "$WHEELS" "$D2/detectron2"; do
    [ -e "$path" ] || { echo "device_gpu: $path is missing: run --prepare, and carry .devwheels and .devd2" >&2; return 2; }
  done
  echo "== $(date -Is) $(hostname); $PYTHON = $("$PYTHON" --version 2>&1); detectron2 $(cat .devd2/REVISION 2>/dev/null)"
  nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"

  echo "== install .devwheels into $SITE"
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD/$D2:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" - <<'EOF'
import detectron2, torch, torchvision
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__} from {detectron2.__file__}")
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import detectron2.modeling, d2prune.pruning  # noqa: F401
EOF
  echo "== setup took $(( $(date +%s) - start )) s"

  echo "== tests/test_cuda.py"
  set +e
  timeout "${TEST_TIMEOUT:-120}" "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$OUT/test_cuda.xml" tests/test_cuda.py
  rc_tests=$?
  echo "== tests exit status $rc_tests after $(( $(date +%s) - start )) s"

  echo "== tools/benchmark_gpu.py"
  # shellcheck disable=SC2086  # BATCHES and DTYPES are lists
  timeout "${BENCH_TIMEOUT:-300}" "$PYTHON" tools/benchmark_gpu.py --device "${DEVICE:-cuda}" \
    --side "${SIDE:-800}" --batches ${BATCHES:-1 8} --dtypes ${DTYPES:-fp32 fp16} \
    --formats nchw channels_last --repeats "${REPEATS:-50}" --warmup "${WARMUP:-5}" \
    --output "$OUT/benchmark_gpu.md" --json "$OUT/benchmark_gpu.json"
  rc_bench=$?
  set -e
  echo "== benchmark exit status $rc_bench; total $(( $(date +%s) - start )) s"
  [ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
}

case "${1:-}" in
  --prepare) prepare ;;
  "")
    export PYTHONUNBUFFERED=1 PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
    OUT=${OUT:-output/gpu}
    SITE=${SITE:-/tmp/site}
    mkdir -p "$OUT"
    run 2>&1 | tee "$OUT/log.txt"
    ;;
  *) echo "usage: bash tools/setup/device_gpu.sh [--prepare]" >&2; exit 2 ;;
esac
