#!/usr/bin/env bash
# GPU check: on a machine with CUDA, calibrate this GPU, run the CUDA tests and a short
# benchmark, and write a summary. Needs nothing from the network: it uses the Python
# environment as it is (torch, bitsandbytes, safetensors, tokenizers, typer, rich, pyyaml,
# transformers for the tests) and this checkout on PYTHONPATH. Each step has its own time
# limit, so that one step that hangs or fails still leaves the others' results; the whole
# check stays under 10 minutes (GPU_CHECK_LIMITS="calibrate tests bench" in seconds).
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# OUT_DIR gets: calibrated-gpu.yaml, calibrate.log, cuda_tests.log, gpu_bench.log,
# gpu_bench.json (one JSON object, rewritten after each stage), profiler_trace.json and
# summary.json (each step's exit status and seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
read -r t_cal t_tests t_bench <<<"${GPU_CHECK_LIMITS:-100 180 220}"

python3 - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

steps=()
step() {  # step NAME LIMIT_S LOG COMMAND...: run with a time limit, log to OUT_DIR/LOG, show the tail
    local name=$1 limit=$2 log=$3 t0=$SECONDS rc
    shift 3
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$log" 2>&1
    rc=$?
    tail -n 30 "$out/$log"
    echo "== $name: rc=$rc in $((SECONDS - t0))s"
    steps+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

# The profile a cuda run without --hardware uses: calibrated once into a moespeq cache of
# this check's own (the tests and the benchmark then price this GPU), and a copy beside
# the results.
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export XDG_CACHE_HOME=$cache MOESPEQ_TEST_PROFILES=$cache/moespeq/profiles
step calibrate "$t_cal" calibrate.log python3 - "$out/calibrated-gpu.yaml" <<'PY'
import shutil, sys, time
from moespeq_cli.runtime.planning.calibrate import cached_gpu_profile
t0 = time.perf_counter()
hw = cached_gpu_profile(say=lambda s: print("calibrate:", s, flush=True))
print(f"calibrated {hw.name} in {time.perf_counter() - t0:.1f} s: {hw.source}")
shutil.copy(hw.source, sys.argv[1])
print(open(sys.argv[1]).read())
PY

# The CUDA tests, four at a time where pytest-xdist is installed (each builds its own tiny
# checkpoints on the CPU), each test limited where pytest-timeout is.
par=()
python3 -c "import xdist" 2>/dev/null && par+=(-n 4)
python3 -c "import pytest_timeout" 2>/dev/null && par+=(--timeout=120)
step "cuda tests" "$t_tests" cuda_tests.log python3 -m pytest tests/test_cuda.py -v -rA -p no:cacheprovider "${par[@]}"

profile=()
[ -s "$out/calibrated-gpu.yaml" ] && profile=(--profile "$out/calibrated-gpu.yaml")
step benchmark "$t_bench" gpu_bench.log python3 scripts/gpu_bench.py --out "$out/gpu_bench.json" "${profile[@]}"

(IFS=,; echo "{${steps[*]}}") >"$out/summary.json"
echo "== summary: $(cat "$out/summary.json") (results in $out)"
grep -q '"rc": [1-9]' "$out/summary.json" && exit 1
exit 0
