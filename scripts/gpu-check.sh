#!/usr/bin/env bash
# One prepared check of the project on a CUDA machine (issue 13), in under 8 minutes:
#   1. installs the packages the GPU image lacks from wheels brought along in .whl/
#      (fastapi, pydantic, pydantic-settings, uvicorn, orjson, redis, python-multipart and
#      their own needs, deepctr-torch for the training comparison) into a private folder;
#   2. runs the CUDA tests: pytest -m "not slow" over tests/models, tests/test_artifact.py,
#      tests/test_onnx_export.py, tests/training and the service's torch-runtime tests, with
#      the device fixture on CUDA (MDLORA_TEST_DEVICE=cuda; the CPU half runs in CI), the
#      grouped Triton kernels strict (MDLORA_GROUPED_STRICT=1: a failure fails, no fallback);
#   3. runs benchmarks/bench_gpu.py (routing, training, service; its last line is JSON).
# Logs go to $OUT (the device tool's output folder; /tmp/gpu-check otherwise).
#
# Bring the wheels (here, once; .whl/ is ignored by git and carried by the device tool):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl fastapi starlette pydantic pydantic_core pydantic-settings uvicorn orjson redis \
#     python-multipart typing-inspection annotated-types annotated-doc python-dotenv \
#     typing_extensions opentelemetry-api deepctr-torch
# then, on the device tool: run(command="bash scripts/gpu-check.sh", carry=[".whl"]).
#
# Then, optionally (a second call: REPRODUCE=1 SKIP_TESTS=1 SKIP_BENCH=1): 4. a timed slice of
# mdlora reproduce --device cuda, to estimate the whole grid's time on the GPU.
#
# Knobs: TEST_TIMEOUT (s, default 200), BENCH_TIMEOUT (s, default 260), WORKERS (pytest-xdist
# workers, default 8), TESTS (paths), SKIP_TESTS=1, SKIP_BENCH=1, BENCH_ARGS (e.g.
# "--skip-service").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/mdlora-site}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*"; }

# ---------------------------------------------------------------------------- 1. packages
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl >"$OUT/install.log" 2>&1; then
    stamp "installed $(ls .whl/*.whl | wc -l) wheels into $SITE"
  else
    stamp "wheel install FAILED:"; tail -n 20 "$OUT/install.log"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  stamp "no .whl/ folder: using the packages already installed"
fi
"$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0))
for name in ("fastapi", "pydantic", "pydantic_settings", "uvicorn", "orjson", "redis",
             "multipart", "numba", "onnxruntime", "onnxscript", "deepctr_torch", "xdist", "triton",
             "pytest_timeout"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "ok"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", type(exc).__name__, exc)
EOF
cat "$OUT/env.txt"

# ------------------------------------------------------------------------------- 2. tests
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  TESTS=${TESTS:-tests/models tests/formats tests/training
    tests/service/test_torch_runtime_device.py tests/service/test_snapshot.py
    tests/service/test_predict_api.py}
  XDIST=""
  if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n ${WORKERS:-8} --dist loadscope"; fi
  stamp "tests (MDLORA_TEST_DEVICE=cuda, xdist: ${XDIST:-none})"
  # -v: each result is logged as it comes, so a run stopped by the timeout still names them
  MDLORA_TEST_DEVICE=cuda MDLORA_GROUPED_STRICT=1 timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest -m "not slow" -v \
    -p no:cacheprovider $XDIST --timeout 200 -o addopts="" \
    --import-mode=importlib -rfE --junitxml "$OUT/junit.xml" $TESTS >"$OUT/tests.log" 2>&1
  rc=$?
  stamp "tests exit code $rc"
  grep -E " (FAILED|ERROR) |^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT/tests.log" \
    | sort -u | tail -n 40
  echo "passed so far: $(grep -c " PASSED " "$OUT/tests.log")"
fi

# --------------------------------------------------------------------------- 3. benchmark
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  stamp "benchmarks/bench_gpu.py ${BENCH_ARGS:-}"
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-260}" "$PY" benchmarks/bench_gpu.py ${BENCH_ARGS:-} \
    >"$OUT/bench.log" 2>&1
  rc=$?
  stamp "bench exit code $rc"
  tail -n 45 "$OUT/bench.log"
  tail -n 1 "$OUT/bench.log" >"$OUT/bench.json"
fi
# ------------------------------------------------------------- 4. reproduce (optional)
# REPRODUCE=1 (a second device call: the two sections above take the first's 8 minutes):
# table 1's gender cells, seed 1, on REPRODUCE_BACKBONES with --workers (one group per
# backbone, so each worker takes one), timed per cell, to estimate the 312-cell grid on this
# GPU (target: under 20 minutes). ML-1M from ../shared/data when present, else a generated
# look-alike of its size (the timing is what counts here, not the numbers).
if [ "${REPRODUCE:-0}" = "1" ]; then
  DATA=${DATA_DIR:-../shared/data}
  if [ ! -f "$DATA/ml-1m/ratings.dat" ] && [ ! -f "$DATA/ml-1m/ratings_no_timestamp.dat" ]; then
    DATA=/tmp/mdlora-ml1m-like
    "$PY" -c "from mdlora.training.data.synthetic import write_movielens_1m_like as w; \
w('$DATA/ml-1m', n_users=6040, n_movies=3706, n_ratings=1_000_209)"
  fi
  BACKBONES=${REPRODUCE_BACKBONES:-deepfm,dcn,wdl,nfm,autoint,pnn}
  stamp "reproduce: table1, gender, seed 1, $BACKBONES, ${REPRODUCE_WORKERS:-6} workers, $DATA"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${REPRODUCE_TIMEOUT:-420}" "$PY" -m mdlora.cli.reproduce \
    --device "${REPRODUCE_DEVICE:-cuda}" ${REPRODUCE_ARGS:-} --workers "${REPRODUCE_WORKERS:-6}" \
    --table table1 --split gender --seed 1 \
    --backbone "$BACKBONES" --data-dir "$DATA" --results-dir "$OUT/reproduce" \
    --work-dir /tmp/mdlora-reproduce --docs-dir "$OUT/reproduce-docs" >"$OUT/reproduce.log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - t0 ))
  stamp "reproduce exit code $rc after $wall s"
  tail -n 5 "$OUT/reproduce.log"
  "$PY" - "$OUT/reproduce" "$wall" "${REPRODUCE_WORKERS:-6}" <<'PYEOF'
import json, pathlib, statistics, sys
root, wall, workers = pathlib.Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
cells = [json.loads(p.read_text()) for p in root.rglob("*.json")]
cells = [c for c in cells if isinstance(c, dict) and "seconds" in c]
if not cells:
    sys.exit("no finished cell")
for c in sorted(cells, key=lambda c: (c["backbone"], c["method"])):
    print(f"  {c['backbone']:8s} {c['method']:12s} {c['seconds']:7.1f} s")
mean = statistics.fmean(c["seconds"] for c in cells)
print(f"{len(cells)} cells in {wall:.0f} s wall with {workers} workers, {mean:.1f} s a cell: the "
      f"312-cell grid at this rate ~{312 * wall / len(cells) / 60:.1f} min "
      f"({312 * mean / 60:.1f} min of cell time)")
PYEOF
fi
stamp "done"
