#!/usr/bin/env bash
# GPU check: on a machine with CUDA, run the CUDA tests and a short benchmark, print a
# summary. Needs nothing from the network: it uses the Python environment as it is
# (torch, safetensors, tokenizers, typer, rich, pyyaml, transformers for the tests) and
# this checkout on PYTHONPATH.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

echo "== calibrate this GPU (the profile runs without --hardware use)"
python3 -m moespeq_cli calibrate --out "$out/calibrated-gpu.yaml" --json 2>&1 | tee "$out/calibrate.log"

echo "== CUDA tests (races with every copy slowed, syncs per token, memory against the plan, tokens per policy)"

python3 -m pytest tests/test_cuda.py -v -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark"
python3 scripts/gpu_bench.py --out "$out/gpu_bench.json" --profile "$out/calibrated-gpu.yaml" 2>&1 | tee "$out/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== summary: tests rc=$tests_rc, bench rc=$bench_rc (results in $out)"
exit $(( tests_rc || bench_rc ))
