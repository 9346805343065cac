#!/usr/bin/env bash
# The one command for a GPU machine: environment, GPU tests, then benchmarks/bench_gpu.py.
#
#   OUT=/some/empty/folder bash benchmarks/gpu_session.sh
#   GPU_SESSION_TINY=1 OUT=/tmp/out bash benchmarks/gpu_session.sh   # CPU rehearsal
#
# Runs in the repository root, with .data/cifar10.tar.gz (a tar of cifar10/{train,test}/
# <class>/*.jpg) beside it, no network, and `python3` holding torch (numpy, onnx,
# onnxruntime and pytest too). Nothing is installed: the package is staged under /tmp/pkg
# and put on PYTHONPATH, and the tests run from that copy, so no other copy of
# center_embed (the checkout's, an installed one) can be imported instead.
#
# Writes five files to $OUT: env.txt, pytest.log, bench.log, results.json (written after
# every benchmark stage), summary.txt. Every stage runs under `timeout`, and a failing
# stage does not stop the next. The whole session keeps within SESSION_BUDGET seconds
# (default 420): the benchmark gets what the stages before it left.
#
# Environment: OUT (required), GPU_SESSION_TINY=1 (tiny CPU-sized benchmark),
# SESSION_BUDGET, BENCH_ARGS (extra arguments for bench_gpu.py), CENTER_EMBED_COMMIT (the
# commit to record when the copy of the repository has no .git).
set -uo pipefail

: "${OUT:?set OUT to an empty folder for the results}"
mkdir -p "$OUT"
REPO=$(pwd)
START=$(date +%s)
BUDGET=${SESSION_BUDGET:-420}
TINY=${GPU_SESSION_TINY:-0}
PKG=/tmp/pkg
DATA_ROOT=/tmp/ce-data
export CENTER_EMBED_CACHE=/tmp/ce-cache
export CENTER_EMBED_COMMIT=${CENTER_EMBED_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
PYTEST_STATUS=skipped
BENCH_STATUS=skipped

left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo; echo "### $* ($(($(date +%s) - START)) s in, $(left) s left)"; }

# ---------------------------------------------------------------- environment
say "environment"
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cpus: $(nproc)  commit: $CENTER_EMBED_COMMIT"
  if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi
    timeout 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version \
      --format=csv
  else
    echo "nvidia-smi: absent"
  fi
  echo "gcc: $(command -v gcc || echo absent)  (torch.compile's Triton needs a C compiler)"
  timeout 120 python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB",
          f"capability {p.major}.{p.minor}", "cudnn", torch.backends.cudnn.version(),
          "bf16", torch.cuda.is_bf16_supported())
for name in ("numpy", "onnx", "onnxruntime", "triton", "PIL", "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as e:
        print(name, "absent:", type(e).__name__, e)
try:
    import onnxruntime
    print("onnxruntime providers", onnxruntime.get_available_providers())
except Exception:
    pass
EOF
} 2>&1 | tee "$OUT/env.txt"

# ---------------------------------------------------------------- data
say "data"
DATA=$DATA_ROOT/cifar10
if [ -d "$DATA/train" ]; then
  echo "already unpacked: $DATA"
elif [ -f .data/cifar10.tar.gz ]; then
  rm -rf "$DATA_ROOT" && mkdir -p "$DATA_ROOT"
  timeout 300 tar xzf .data/cifar10.tar.gz -C "$DATA_ROOT" || echo "untar failed ($?)"
  echo "train images: $(find "$DATA/train" -type f | wc -l), test images: $(find "$DATA/test" -type f | wc -l)"
else
  echo "no .data/cifar10.tar.gz in $REPO: the benchmark will fail at its data stage"
fi

# ---------------------------------------------------------------- staging
say "staging the package under $PKG"
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r center_embed "$PKG/"
for sub in export service; do
  if [ -d "$sub" ]; then  # moving under the center_embed namespace: importable both ways
    [ -e "$PKG/center_embed/$sub" ] || cp -r "$sub" "$PKG/center_embed/$sub"
    cp -r "$sub" "$PKG/$sub"
  fi
done
cp -r tests "$PKG/tests"
cp pyproject.toml "$PKG/"  # pytest's markers and options
find "$PKG" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH=$PKG CENTER_EMBED_STAGED=1
(cd /tmp && python3 -c "import center_embed; print('center_embed imports from', center_embed.__file__)")

# ---------------------------------------------------------------- tests
# From the staged copy: pytest puts the rootdir of tests/ (a package) first on sys.path,
# and `python3 -m` the working directory; here both are $PKG, never the checkout.
say "tests (marker gpu, and the center-loss and training tests)"
T=$(( $(left) - 200 )); [ "$T" -gt 300 ] && T=300; [ "$T" -lt 60 ] && T=60
(
  cd "$PKG" && timeout -k 10 "$T" python3 -m pytest -q -p no:cacheprovider -rs \
    -m "gpu or not slow" tests/training/test_gpu.py tests/training/test_center_loss.py \
    tests/training/test_train.py
) 2>&1 | tee "$OUT/pytest.log"
PYTEST_STATUS="exit ${PIPESTATUS[0]}"

# ---------------------------------------------------------------- benchmark
say "benchmark"
B=$(( $(left) - 25 )); [ "$B" -lt 60 ] && B=60
if [ "$TINY" = 1 ]; then
  DEVICE=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  set -- --tiny --device "$DEVICE" --seeds 2 --wide-seeds 1
else
  set -- --device cuda
fi
# shellcheck disable=SC2086
timeout -k 15 "$((B + 20))" python3 "$REPO/benchmarks/bench_gpu.py" "$@" --data "$DATA" \
  --json "$OUT/results.json" --budget "$B" --work /tmp/bench-work ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/bench.log"
BENCH_STATUS="exit ${PIPESTATUS[0]}"

# ---------------------------------------------------------------- summary (printed last)
say "summary"
{
  echo "tests: $PYTEST_STATUS; $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/pytest.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$OUT/pytest.log" | head -20
  echo "benchmark: $BENCH_STATUS"
  if [ -f "$OUT/results.json" ]; then
    timeout 60 python3 "$REPO/benchmarks/bench_gpu.py" --summary "$OUT/results.json"
  else
    echo "no results.json"
  fi
  echo "session: $(($(date +%s) - START)) s"
} 2>&1 | tee "$OUT/summary.txt"
