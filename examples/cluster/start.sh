#!/usr/bin/env bash
# Starts the three example nodes on 127.0.0.1 (HTTP 7071-7073, peers
# 7401-7403) and stops them all on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet
pids=()
for i in 1 2 3; do
  ./target/debug/plexus up "examples/cluster/node-$i.toml" 2> "plexus-node-$i.log" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
echo "nodes up: http://127.0.0.1:7071 :7072 :7073 (logs: plexus-node-*.log)"
wait
