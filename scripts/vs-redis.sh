#!/usr/bin/env bash
# Side by side: the kv_server example against redis-server, both on
# loopback, driven by the same redis-benchmark workloads, then killed with
# SIGKILL and restarted to count the acknowledged keys that survived.
#
#   scripts/vs-redis.sh                # 50 000 requests per workload, 3 rounds
#   REQUESTS=200000 scripts/vs-redis.sh
#
# Each round starts every server afresh (redis-server and kv_server with
# each shard count; the round's first server rotates from round to round)
# and runs each workload against it in turn, in the order of TESTS (list
# set before get: GET reads the keys SET wrote). Before each workload the
# dirty pages of the whole machine are written back (`sync`, system-wide)
# and it is left idle for QUIET seconds, so that no workload pays for the
# previous one's write-back. A server is killed (with any child, such as
# redis-server's AOF rewrite) and its files deleted before the next one
# starts. The table shows each row's median over the rounds, and for
# kv_server the median of its per-round ratios to redis-server's
# requests/s (each ratio between runs of the same round, policy, pipeline
# and workload; not the ratio of the printed medians), with the lowest and
# highest round. A workload that fails is reported on stderr and left out.
#
# Environment: REQUESTS (per workload, default 50000), ROUNDS (default 3),
# QUIET (seconds, default 1), ROWS_OUT (a file to copy the per-round rows
# to: round, server, policy, -P, test, requests/s, p50 and p99 in ms, RSS
# in MiB, fds), CLIENTS (default 50), KEYS (random key space, default 100000),
# SURVIVAL_KEYS (default 20000), REDIS_PORT (default 16379), KV_PORT
# (default 16380), SHARDS (kv_server's shard counts, space-separated, each
# benchmarked; default: 1 and one per core), TESTS (redis-benchmark's -t,
# comma-separated, default ping,set,get,incr,mset), POLICIES (default
# "everysec always"), PIPELINES (default "1 16"). For instance, the
# everysec goal's rows alone, in runs long enough to span syncs:
#   TESTS=set,get POLICIES=everysec PIPELINES=16 SHARDS=1 REQUESTS=1000000 scripts/vs-redis.sh
# (A million SETs grow redis-server's AOF past its rewrite threshold, so
# its rows may include a rewrite, as they would in production.)
# One shard is the like-for-like row: redis-server serves from one thread,
# and redis-benchmark runs on the same machine. The survival check uses
# the first shard count.
# Installs redis-server and redis-tools with apt-get when they are missing.
# It takes no arguments: any (`--help` too) prints this text and exits.
set -euo pipefail
if [ "$#" -gt 0 ]; then
    sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    [ "$1" = "--help" ] || [ "$1" = "-h" ] && exit 0
    exit 2
fi
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-50000}
ROUNDS=${ROUNDS:-3}
QUIET=${QUIET:-1}
CLIENTS=${CLIENTS:-50}
KEYS=${KEYS:-100000}
SURVIVAL_KEYS=${SURVIVAL_KEYS:-20000}
REDIS_PORT=${REDIS_PORT:-16379}
KV_PORT=${KV_PORT:-16380}
SHARDS=${SHARDS:-$(printf '%s\n' 1 "$(nproc)" | sort -nu | tr '\n' ' ')}
KV_SHARDS=${SHARDS%% *}
TESTS=${TESTS:-ping,set,get,incr,mset}
POLICIES=${POLICIES:-everysec always}
PIPELINES=${PIPELINES:-1 16}

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null \
    || ! command -v redis-cli >/dev/null; then
    echo "installing redis-server and redis-tools" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi

echo "building kv_server" >&2
cargo build --release --example kv_server -q
KV_BIN=$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/examples/kv_server

WORK=$(mktemp -d /tmp/vs-redis.XXXXXX)
REDIS_PID=""
KV_PID=""
cleanup() {
    kill_redis
    kill_kv
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { # port
    for _ in $(seq 1 300); do
        redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "nothing answers on port $1" >&2
    exit 1
}

start_redis() { # policy
    mkdir -p "$WORK/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
        --appendonly yes --appendfsync "$1" --save "" --daemonize no \
        --logfile "$WORK/redis.log" &
    REDIS_PID=$!
    wait_port "$REDIS_PORT"
}

start_kv() { # policy
    "$KV_BIN" --port "$KV_PORT" --dir "$WORK/kv" --shards "$KV_SHARDS" --sync "$1" \
        >"$WORK/kv.out" 2>>"$WORK/kv.log" &
    KV_PID=$!
    for _ in $(seq 1 600); do
        grep -q "listening on 127.0.0.1:$KV_PORT" "$WORK/kv.out" 2>/dev/null && return 0
        kill -0 "$KV_PID" 2>/dev/null || { cat "$WORK/kv.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "kv_server did not get ready" >&2
    exit 1
}

kill9() { # pid: SIGKILL it and its children (redis-server's AOF rewrite)
    pkill -9 -P "$1" 2>/dev/null || true
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
kill_redis() { [ -z "$REDIS_PID" ] || kill9 "$REDIS_PID"; REDIS_PID=""; }
kill_kv() { [ -z "$KV_PID" ] || kill9 "$KV_PID"; KV_PID=""; }

rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }

ROWS="$WORK/rows"
: >"$ROWS"

# One workload against one server, after its pages and everyone else's are
# written back; appends "round server policy P test rps p50 p99 rss fds".
bench() { # round name policy port pid
    local round=$1 name=$2 policy=$3 port=$4 pid=$5 pipeline test csv
    for pipeline in $PIPELINES; do
        for test in ${TESTS//,/ }; do
            sync
            sleep "$QUIET"
            if ! csv=$(redis-benchmark -h 127.0.0.1 -p "$port" -t "$test" -d 100 -P "$pipeline" \
                -c "$CLIENTS" -r "$KEYS" -n "$REQUESTS" --csv 2>"$WORK/bench.err"); then
                echo "round $round: $name $policy -P $pipeline $test failed:" \
                    "$(tail -n 1 "$WORK/bench.err")" >&2
                continue
            fi
            # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
            echo "$csv" | tr -d '"' | awk -F, -v r="$round" -v s="$name" -v p="$policy" \
                -v P="$pipeline" -v rss="$(rss_mib "$pid")" -v fds="$(fds "$pid")" \
                'NR > 1 { gsub(/ /, "_", $1); print r, s, p, P, $1, $2, $5, $7, rss, fds }' \
                >>"$ROWS"
        done
    done
}

# redis-server, then each kv_server shard count; round r starts at the r-th.
read -r -a SERVERS <<<"redis $SHARDS"
for round in $(seq 1 "$ROUNDS"); do
    for policy in $POLICIES; do
        echo "round $round of $ROUNDS: appendfsync/--sync $policy" >&2
        for ((j = 0; j < ${#SERVERS[@]}; j++)); do
            server=${SERVERS[$(((j + round - 1) % ${#SERVERS[@]}))]}
            if [ "$server" = redis ]; then
                rm -rf "$WORK/redis"
                start_redis "$policy"
                bench "$round" redis-server "$policy" "$REDIS_PORT" "$REDIS_PID"
                kill_redis
                rm -rf "$WORK/redis"
            else
                KV_SHARDS=$server
                rm -rf "$WORK/kv"
                start_kv "$policy"
                bench "$round" "kv_server/$KV_SHARDS" "$policy" "$KV_PORT" "$KV_PID"
                kill_kv
                rm -rf "$WORK/kv"
            fi
        done
    done
done
KV_SHARDS=${SHARDS%% *}
[ -z "${ROWS_OUT:-}" ] || cp "$ROWS" "$ROWS_OUT"

echo
echo "redis-benchmark -d 100 -c $CLIENTS -r $KEYS -n $REQUESTS, one -t at a time;" \
    "medians of $ROUNDS rounds (kv_server/N: N shards)"
printf "%-12s %-9s %3s %-16s %12s %8s %8s %8s %5s %8s %s\n" server sync -P test "requests/s" \
    p50_ms p99_ms rss_MiB fds vs_redis "lowest-highest"
awk -v rounds="$ROUNDS" '
    # The median of a[1..n] (sorted in place); -1 when n is 0.
    function med(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        if (n == 0) return -1
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function median(key, col,   n, i, v) {
        n = 0
        for (i = 1; i <= rounds; i++) if ((i SUBSEP key) in row) { split(row[i, key], f, " "); v[++n] = f[col] + 0 }
        return med(v, n)
    }
    {
        key = $2 " " $3 " " $4 " " $5
        if (!(key in seen)) { seen[key] = 1; order[++keys] = key }
        row[$1, key] = $6 " " $7 " " $8 " " $9 " " $10
    }
    END {
        for (k = 1; k <= keys; k++) {
            key = order[k]; split(key, id, " ")
            ratio = ""; range = ""
            if (id[1] != "redis-server") {
                base = "redis-server " id[2] " " id[3] " " id[4]
                n = 0; lo = 1e18; hi = 0
                for (i = 1; i <= rounds; i++) {
                    if (!((i SUBSEP key) in row) || !((i SUBSEP base) in row)) continue
                    split(row[i, key], a, " "); split(row[i, base], b, " ")
                    if (b[1] + 0 <= 0) continue
                    q = a[1] / b[1]; r[++n] = q
                    if (q < lo) lo = q
                    if (q > hi) hi = q
                }
                if (n > 0) { ratio = sprintf("%.2f", med(r, n)); range = sprintf("%.2f-%.2f", lo, hi) }
            }
            printf "%-12s %-9s %3s %-16s %12.0f %8.3f %8.3f %8.1f %5g %8s %s\n", id[1], id[2], id[3], id[4],
                median(key, 1), median(key, 2), median(key, 3), median(key, 4), median(key, 5), ratio, range
        }
    }' "$ROWS"

# Survival: write SURVIVAL_KEYS keys through redis-cli --pipe (every reply
# received means acknowledged), SIGKILL, restart, count the keys that hold
# their value.
survival() { # name port start-function
    local name=$1 port=$2 start=$3 acked got
    acked=$(awk -v n="$SURVIVAL_KEYS" 'BEGIN { for (i = 0; i < n; i++) {
                k = "survive:" i; v = "value-" i
                printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, length(v), v } }' \
        | redis-cli -p "$port" --pipe | sed -n 's/.*errors: 0, replies: \([0-9]*\).*/\1/p')
    if [ "$name" = redis-server ]; then kill_redis; else kill_kv; fi
    $start everysec
    got=$(awk -v n="$SURVIVAL_KEYS" 'BEGIN { for (i = 0; i < n; i++) print "GET survive:" i }' \
        | redis-cli -p "$port" | awk '/^value-/ { c++ } END { print c + 0 }')
    printf "%-12s acknowledged %6s, after kill -9 and restart %6s\n" "$name" "${acked:-0}" "$got"
}

echo
echo "kill -9 survival (appendfsync/--sync everysec, $SURVIVAL_KEYS keys):"
rm -rf "$WORK/redis" "$WORK/kv"
start_redis everysec
survival redis-server "$REDIS_PORT" start_redis
kill_redis
start_kv everysec
survival kv_server "$KV_PORT" start_kv
kill_kv
