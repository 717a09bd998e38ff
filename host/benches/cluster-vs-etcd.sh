#!/usr/bin/env bash
# The cluster benchmark side by side with a 3-member etcd: installs etcd
# 3.4 (Debian's etcd-server) when no `etcd` is on the PATH, then runs
#   cargo bench -p plexus --bench cluster -- --etcd ETCD ARGS...
# e.g. host/benches/cluster-vs-etcd.sh --seconds 10 --clients 256 --trials 20
# ETCD=path picks another etcd binary. Debian's package may also start an
# etcd service on the default ports; the benchmark uses ports of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."

etcd=${ETCD:-$(command -v etcd || true)}
if [ -z "$etcd" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing etcd-server (apt-get)" >&2
    $sudo apt-get install -y -qq etcd-server >/dev/null ||
        { $sudo apt-get update -qq && $sudo apt-get install -y -qq etcd-server >/dev/null; }
    etcd=$(command -v etcd)
fi
"$etcd" --version | head -1 >&2
exec cargo bench -p plexus --bench cluster -- --etcd "$etcd" "$@"
