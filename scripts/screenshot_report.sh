#!/usr/bin/env bash
# Render the profile report in headless Chromium (Debian's chromium package) and save a
# screenshot as docs/profile-report.png; capture the live view under tmux into
# docs/profile-live.txt. Both are committed and kept current.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; tmux kill-session -t moespeq-live 2>/dev/null || true' EXIT
moespeq profile --no-live -n 96 --report "$tmp/report.html" --trace "$tmp/trace.json" >/dev/null
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$tmp/chrome" --hide-scrollbars \
  --window-size=1280,1100 --screenshot=docs/profile-report.png "file://$tmp/report.html" 2>/dev/null
tmux new-session -d -s moespeq-live -x 112 -y 34 "moespeq profile -n 96; sleep 60"
sleep "${LIVE_WAIT:-20}"
tmux capture-pane -p -t moespeq-live | sed -e 's/[[:space:]]*$//' | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' >docs/profile-live.txt
echo "wrote docs/profile-report.png and docs/profile-live.txt"
