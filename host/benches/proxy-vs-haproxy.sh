#!/usr/bin/env bash
# The proxy benchmark side by side with HAProxy: installs nginx (the
# backend), HAProxy and wrk from Debian when they are missing, then runs
#   cargo bench -p plexus --bench proxy -- --nginx N --haproxy H --wrk W ARGS...
# e.g. host/benches/proxy-vs-haproxy.sh --seconds 10 --rounds 3
# or, the load balancer alone next to HAProxy's leastconn and random(2):
#   host/benches/proxy-vs-haproxy.sh --seconds 0 --forward-seconds 0 --balance-seconds 10
# or the ambassador and the strangler fig next to HAProxy and NGINX:
#   host/benches/proxy-vs-haproxy.sh --seconds 0 --forward-seconds 0 --balance-seconds 0 --edge-seconds 10
# The packages may start system services on their default ports; the
# benchmark uses ports of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing ${need[*]} (apt-get)" >&2
    $sudo apt-get install -y -qq "${need[@]}" >/dev/null ||
        { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null; }
fi
nginx=$(command -v nginx || echo /usr/sbin/nginx)
haproxy -v | head -1 >&2
exec cargo bench -p plexus --bench proxy -- --nginx "$nginx" --haproxy "$(command -v haproxy)" --wrk "$(command -v wrk)" "$@"
