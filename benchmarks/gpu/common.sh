# Sourced by the device-call scripts beside it. Sets R (work folder that outlives one call while the
# machine stays warm), OUT (what comes back), PYTHONPATH, and defines log / pack / install_wheels.
# CPU dry run (no device): OUT=/tmp/out CTXEXT_GPU_DRY=1 bash benchmarks/gpu/<script>.sh
R=${CTXEXT_GPU_WORK:-/tmp/ctxext-gpu}
OUT=${OUT:-$R/out}
mkdir -p "$R" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

log() { echo "[$(date -u +%T)] $*"; }

# pack NAME: one archive of $R (logs and reports; no wheels, checkpoints or data caches) as $OUT/NAME.tgz.
# The device returns at most 8 files; re-packing after each stage keeps what finished if a later one
# runs out of time.
pack() {
    (cd "$R" && tar czf "$OUT/$1.tgz" --exclude='checkpoints' --exclude='.cache' --exclude='*.whl' \
        --exclude='smol.part*' --exclude='out' . 2>/dev/null) || true
}

# install_wheels WHEEL...: the packages the GPU image lacks, into /tmp/site (no network there).
install_wheels() {
    [ "$#" -gt 0 ] || return 0
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"
}
