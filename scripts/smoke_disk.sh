#!/usr/bin/env bash
# Disk-tier smoke test: the installed `moespeq` command on the built-in demo model with a
# RAM budget below its experts, on the cpu backend (wall clock, experts read from disk)
# and on the mock (three tiers); every output checked. Run by .ci/run.
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "-- run --backend cpu --ram: the same tokens as the plain reference, read from disk"
ref=$(moespeq run --backend cpu -n 16 --json | python3 -c "import json,sys; print(json.load(sys.stdin)['token_ids'])")
for policy in lru gate-prefetch ondemand moespeq; do
  moespeq run --backend cpu --ram 6MB -n 16 --policy "$policy" --json --trace "$tmp/$policy.trace.json" >"$tmp/$policy.json"
  python3 - "$tmp/$policy.json" "$tmp/$policy.trace.json" "$policy" "$ref" <<'PY'
import json, sys
out = json.load(open(sys.argv[1])); trace = json.load(open(sys.argv[2]))
s = out["stats"]
assert out["policy"] == sys.argv[3] and out["backend"] == "cpu" and s["clock"] == "wall", out
assert out["plan"]["disk_tier"] and s["bytes_read"] > 0 and s["bytes_h2d"] is None
assert str(out["token_ids"]) == sys.argv[4], "other tokens than the reference"
assert any(e.get("cat") == "read" for e in trace["traceEvents"])
print(f"   {sys.argv[3]:14} {s['tokens_per_s']:8.1f} tok/s (wall), {s['bytes_read'] / 1e6:6.1f} MB read, hit rate {s['expert_hit_rate']:.2f}")
PY
done

echo "-- three tiers on the mock"
moespeq run --backend mock --ram 6MB -n 16 --json >"$tmp/mock.json"
python3 - "$tmp/mock.json" "$ref" <<'PY'
import json, sys
out = json.load(open(sys.argv[1]))
assert out["plan"]["disk_tier"] and out["stats"]["bytes_read"] > 0 and str(out["token_ids"]) == sys.argv[2]
print(f"   mock: {out['stats']['tokens_per_s']:.1f} tok/s (virtual), {out['stats']['bytes_read'] / 1e6:.1f} MB read")
PY

echo "-- bench --backend cpu --ram"
moespeq bench --backend cpu --ram 6MB -n 8 --json >"$tmp/bench.json"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['disk_tier'] and len(d['results']) == 4, d" "$tmp/bench.json"

echo "-- profile --backend cpu --ram"
moespeq profile --backend cpu --ram 6MB -n 8 --no-live --report "$tmp/p.html" --json >"$tmp/p.json"
grep -q "<svg" "$tmp/p.html"

echo "-- plan --ram, offline"
moespeq plan mixtral --vram 12GB --ram 48GB --hardware desktop-3060-ddr4 --json >"$tmp/plan.json"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert all(r['plan']['disk_tier'] for r in d['policies'] if r['fits'])" "$tmp/plan.json"

echo "-- a --ram too small is one line, exit 2"
set +e
moespeq run --backend cpu --ram 1KB -n 2 >/dev/null 2>"$tmp/err"; rc=$?
set -e
test "$rc" = 2 && test "$(wc -l <"$tmp/err")" = 1
echo "smoke_disk: all ok"
