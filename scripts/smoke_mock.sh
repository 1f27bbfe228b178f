#!/usr/bin/env bash
# Mock-GPU smoke test: the installed `moespeq` command end to end on the built-in demo
# model with --backend mock, each output checked. Run by .ci/run.
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "-- moespeq --help answers"
moespeq --help >/dev/null

echo "-- run (text)"
moespeq run --backend mock -n 24 >"$tmp/run.txt" 2>"$tmp/run.err"
test -s "$tmp/run.txt"
grep -q "tokens in" "$tmp/run.err"
grep -q "plan:" "$tmp/run.err"

echo "-- run --json --trace, every policy"
for policy in gate-prefetch lru ondemand hybrid; do
  moespeq run --backend mock -n 16 --policy "$policy" --json --trace "$tmp/$policy.trace.json" >"$tmp/$policy.json"
  python3 - "$tmp/$policy.json" "$tmp/$policy.trace.json" "$policy" <<'PY'
import json, sys
out = json.load(open(sys.argv[1]))
trace = json.load(open(sys.argv[2]))
assert out["policy"] == sys.argv[3] and out["backend"] == "mock" and out["stats"]["clock"] == "virtual"
assert out["stats"]["new_tokens"] == len(out["token_ids"]) > 0
assert out["plan"]["slots"] >= 1
spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
assert spans and all({"ts", "dur", "pid", "tid"} <= set(e) for e in spans)
print(f"   {sys.argv[3]:14} {out['stats']['tokens_per_s']:8.1f} tok/s (virtual), hit rate {out['stats']['expert_hit_rate']:.2f}")
PY
done

echo "-- the same tokens as the cpu backend"
a=$(moespeq run --backend mock -n 16 --json | python3 -c "import json,sys; print(json.load(sys.stdin)['token_ids'])")
b=$(moespeq run --backend cpu -n 16 --json | python3 -c "import json,sys; print(json.load(sys.stdin)['token_ids'])")
test "$a" = "$b"

echo "-- chat through a pipe: one answer per line, commands answered"
printf 'Good morrow\n/stats\nWhat news?\n' | moespeq chat --backend mock -n 12 >"$tmp/chat.txt" 2>"$tmp/chat.err"
test "$(wc -l <"$tmp/chat.txt")" -ge 2
grep -q "tokens in" "$tmp/chat.err"

echo "-- serve: the OpenAI API on loopback"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
moespeq serve --backend mock --port "$port" 2>"$tmp/serve.err" &
serve_pid=$!
for _ in $(seq 100); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health')" 2>/dev/null && break
  sleep 0.2
done
python3 - "$port" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}/v1"
body = json.dumps({"messages": [{"role": "user", "content": "Good morrow"}], "max_tokens": 8, "temperature": 0}).encode()
req = urllib.request.Request(base + "/chat/completions", body, {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req))
assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] == 8, out
print("   answer:", repr(out["choices"][0]["message"]["content"]))
PY
kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true

echo "-- a bad option is one line, exit 2"
set +e
moespeq run --backend mock --vram 1KB >/dev/null 2>"$tmp/err"; rc=$?
set -e
test "$rc" = 2 && test "$(wc -l <"$tmp/err")" = 1

echo "-- profile --no-live --trace --report"
moespeq profile --backend mock -n 24 --no-live --trace "$tmp/p.trace.json" --report "$tmp/p.html" --json >"$tmp/p.json"
python3 - "$tmp/p.json" "$tmp/p.trace.json" "$tmp/p.html" <<'PY'
import json, sys
out = json.load(open(sys.argv[1])); trace = json.load(open(sys.argv[2])); page = open(sys.argv[3]).read()
assert out["stats"]["new_tokens"] == 24
spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
assert any(e["cat"] == "copy" for e in spans) and any(e["cat"] == "compute" for e in spans)
assert "<svg" in page and "Timeline" in page and page.count("<rect") > 20
print("   report and trace ok")
PY

echo "-- bench --json"
moespeq bench --backend mock -n 16 --policies moespeq,hybrid,gate-prefetch,lru,ondemand --json >"$tmp/b.json"
python3 - "$tmp/b.json" <<'PY'
import json, sys
out = json.load(open(sys.argv[1]))
assert [r["policy"] for r in out["results"]] == ["moespeq", "hybrid", "gate-prefetch", "lru", "ondemand"]
for r in out["results"]:
    print(f"   {r['label']:14} {r['stats']['tokens_per_s']:8.1f} tok/s (virtual)  vs gate-prefetch {r['speedup_vs']['gate-prefetch']:.2f}x")
PY

echo "-- hybrid: experts on the CPU, same tokens as the cpu backend"
c=$(moespeq run --backend mock -n 16 --policy hybrid --json | python3 -c "import json,sys; d=json.load(sys.stdin); assert d['stats']['cpu_expert_share'] > 0; print(d['token_ids'])")
test "$c" = "$b"

echo "-- plan, offline, from a bundled config"
moespeq plan mixtral --vram 12GB --ram 96GB --hardware desktop-3060-ddr4 --json >"$tmp/plan.json"
python3 - "$tmp/plan.json" <<'PY'
import json, sys
out = json.load(open(sys.argv[1]))
rows = {r["policy"]: r for r in out["policies"]}
assert rows["moespeq"]["fits"] and rows["hybrid"]["fits"] and not rows["resident"]["fits"]
for name, r in rows.items():
    if r["fits"]:
        print(f"   {name:17} {r['estimate']['tokens_per_s']:6.2f} tok/s (modelled), {r['plan']['slots']} slots")
PY
moespeq plan mixtral --vram 12GB --ram 96GB --hardware desktop-3060-ddr4 >"$tmp/plan.txt"
grep -q "tok/s" "$tmp/plan.txt"

echo "-- quantize (into a temporary copy of the demo model)"
cp -r "$(python3 -c 'from moespeq_cli.model_ref import DEMO_DIR; print(DEMO_DIR)')" "$tmp/demo"
moespeq quantize "$tmp/demo" --json >"$tmp/q.json"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['experts'] == 32 and 0.2 < d['ratio'] < 0.35, d" "$tmp/q.json"
moespeq run "$tmp/demo" --backend mock -n 8 --json | python3 -c "import json,sys; d=json.load(sys.stdin); assert d['draft'].endswith('moespeq-draft-nf4-b64'), d['draft']"
echo "smoke_mock: all ok"
