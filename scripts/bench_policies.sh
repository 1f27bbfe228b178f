#!/usr/bin/env bash
# The MoE-SpeQ policy benchmark (mock backend, deterministic): see scripts/bench_policies.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/bench_policies.py "$@"
