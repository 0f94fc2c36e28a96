#!/usr/bin/env bash
# The xvlm TCP ring against torch gloo across veths: one rank per network namespace, the namespaces
# joined by a bridge (as tests/src/netns.rs builds them), so every ring link is real TCP between two
# network stacks. For each world and size it runs `xvlm-worker bench-allreduce --rank R --peers ...`
# once per namespace, then `scripts/bench_gloo_allreduce.py --rank R --master ...` the same way, and
# prints both busbw (same definitions: median over iterations of the slowest rank, busbw = algbw x
# 2(N-1)/N) and their ratio. With a rate, what the bridge sends each namespace goes through a `tbf`
# token bucket of that rate, so every ring link is limited (a rank receives only through it).
#
#   sudo scripts/bench_allreduce_netns.sh [--worlds "2 3"] [--sizes "4 64"] [--rates "none 1gbit"]
#                                         [--iters 10]
#
# Needs root, iproute2, a built xvlm-worker (XVLM_WORKER, default $CARGO_TARGET_DIR/debug/xvlm-worker)
# and a Python whose torch imports with gloo (GLOO_PYTHON; see scripts/bench_gloo_allreduce.py).
# Everything it creates is removed on exit.
set -euo pipefail

worlds="2 3"
sizes="4 64"
rates="none 1gbit"
iters=10
while [ $# -gt 0 ]; do
    case "$1" in
        --worlds) worlds="$2"; shift 2 ;;
        --sizes) sizes="$2"; shift 2 ;;
        --rates) rates="$2"; shift 2 ;;
        --iters) iters="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
worker="${XVLM_WORKER:-${CARGO_TARGET_DIR:-$root/target}/debug/xvlm-worker}"
python="${GLOO_PYTHON:-python3}"
[ -x "$worker" ] || { echo "no xvlm-worker at $worker (set XVLM_WORKER)" >&2; exit 1; }
"$python" -c "import torch.distributed as d; assert d.is_gloo_available()" 2>/dev/null ||
    { echo "$python has no torch with gloo (set GLOO_PYTHON)" >&2; exit 1; }

prefix="xvb$$"
bridge="${prefix}br"
subnet=10.97.0
max_world=0
for w in $worlds; do [ "$w" -gt "$max_world" ] && max_world=$w; done

cleanup() {
    for ((i = 0; i < max_world; i++)); do ip netns del "${prefix}h$i" 2>/dev/null || true; done
    ip link del "$bridge" 2>/dev/null || true
}
trap cleanup EXIT

ip link add "$bridge" type bridge
ip addr add "$subnet.1/24" dev "$bridge"
ip link set "$bridge" up
for ((i = 0; i < max_world; i++)); do
    ns="${prefix}h$i"
    ip netns add "$ns"
    ip link add "${prefix}v$i" type veth peer name "${prefix}i$i"
    ip link set "${prefix}i$i" netns "$ns"
    ip link set "${prefix}v$i" master "$bridge"
    ip link set "${prefix}v$i" up
    ip -n "$ns" addr add "$subnet.$((11 + i))/24" dev "${prefix}i$i"
    ip -n "$ns" link set "${prefix}i$i" up
    ip -n "$ns" link set lo up
done

# Limits (or frees) what the bridge sends every namespace.
set_rate() {
    for ((i = 0; i < max_world; i++)); do
        if [ "$1" = none ]; then
            tc qdisc del dev "${prefix}v$i" root 2>/dev/null || true
        else
            tc qdisc replace dev "${prefix}v$i" root tbf rate "$1" burst 512kb latency 100ms
        fi
    done
}

# busbw (GB/s) from a bench line.
busbw() { sed -n 's/.*busbw=\([0-9.]*\)GB\/s.*/\1/p' <<<"$1"; }

# Runs "$@ RANK" in namespace RANK for every rank of the world, rank 0's stdout last; prints it.
run_ranks() {
    local world=$1; shift
    local out; out="$(mktemp)"
    local pids=()
    for ((r = 1; r < world; r++)); do
        ip netns exec "${prefix}h$r" env PYTHONWARNINGS=ignore GLOO_SOCKET_IFNAME="${prefix}i$r" "$@" "$r" >/dev/null &
        pids+=($!)
    done
    ip netns exec "${prefix}h0" env PYTHONWARNINGS=ignore GLOO_SOCKET_IFNAME="${prefix}i0" "$@" 0 >"$out"
    for p in "${pids[@]}"; do wait "$p"; done
    cat "$out"; rm -f "$out"
}

port=29600
printf '%-6s %-6s %-8s %-14s %-14s %s\n' world MiB rate "xvlm GB/s" "gloo GB/s" "xvlm/gloo"
for rate in $rates; do
    set_rate "$rate"
    for world in $worlds; do
        for mb in $sizes; do
            port=$((port + 1))
            peers=""
            for ((r = 0; r < world; r++)); do peers+="${peers:+,}$subnet.$((11 + r)):$port"; done
            xvlm="$(run_ranks "$world" "$worker" bench-allreduce --mb "$mb" --iters "$iters" \
                --peers "$peers" --rank)"
            port=$((port + 1))
            gloo="$(run_ranks "$world" "$python" "$root/scripts/bench_gloo_allreduce.py" \
                --world "$world" --mb "$mb" --iters "$iters" --master "$subnet.11:$port" --rank)"
            x="$(busbw "$xvlm")"; g="$(busbw "$gloo")"
            printf '%-6s %-6s %-8s %-14s %-14s %s\n' "$world" "$mb" "$rate" "$x" "$g" \
                "$(awk -v x="$x" -v g="$g" 'BEGIN { printf "%.2f", x / g }')"
        done
    done
done
