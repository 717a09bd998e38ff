#!/usr/bin/env bash
# The work-queue benchmark side by side with RQ on Redis: installs
# redis-server (Debian's) when none is on the PATH and RQ (PyPI, into a
# virtualenv under the target directory), then runs
#   cargo bench -p plexus --bench work-queue -- --redis REDIS --rq-python PYTHON ARGS...
# e.g. host/benches/work-queue-vs-rq.sh --tasks 20000 --workers 4
# REDIS_SERVER=path picks another redis-server. Debian's package may also
# start a Redis service on the default port; the benchmark starts one of
# its own on a free port.
set -euo pipefail
cd "$(dirname "$0")/../.."
. host/benches/bench-venv.sh

redis=${REDIS_SERVER:-$(command -v redis-server || true)}
if [ -z "$redis" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing redis-server (apt-get)" >&2
    $sudo apt-get install -y -qq redis-server >/dev/null ||
        { $sudo apt-get update -qq && $sudo apt-get install -y -qq redis-server >/dev/null; }
    redis=$(command -v redis-server)
fi
"$redis" --version >&2
bench_venv rq
exec cargo bench -p plexus --bench work-queue -- --redis "$redis" --rq-python "$venv/bin/python" "$@"
