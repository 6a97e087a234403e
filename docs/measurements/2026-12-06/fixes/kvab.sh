#!/bin/bash
# A/B: redis-benchmark SET -P 1 and -P 16 against kv_server --sync always, 2 shards
cd /work/meas/s25
for round in 1 2 3; do
  for v in f43 new; do
    d=$(mktemp -d /tmp/kvab.XXXX)
    ./kv-$v --port 16399 --dir $d/kv --shards 2 --sync always > $d/out 2>$d/err &
    pid=$!
    for i in $(seq 1 100); do grep -q listening $d/out 2>/dev/null && break; sleep 0.1; done
    sync
    p1=$(redis-benchmark -p 16399 -t set -P 1 -c 50 -n 100000 -r 100000 -d 100 -q 2>/dev/null | grep -o '[0-9.]* requests per second' | cut -d' ' -f1)
    sync
    p16=$(redis-benchmark -p 16399 -t set -P 16 -c 50 -n 200000 -r 100000 -d 100 -q 2>/dev/null | grep -o '[0-9.]* requests per second' | cut -d' ' -f1)
    kill $pid; wait $pid 2>/dev/null
    rm -rf $d
    echo "round $round $v set_P1 $p1 set_P16 $p16 load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
