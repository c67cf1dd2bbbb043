#!/bin/bash
# usage: run_e2e.sh COMMIT -> prints the cluster's e2e line; kills the run once the cluster part is done
set -u
c=$1
wt=/tmp/bisect/wt-$c
[ -d $wt ] || git -C /work/main worktree add -q --detach $wt $c
cd $wt
# generated protos are committed? make sure they exist
[ -f common/pb/worker_pb2.py ] || /work/main/.venv/bin/python scripts/gen_protos.py >/dev/null 2>&1
log=/tmp/bisect/$c.$(date +%s).log
PYTHONPATH=$wt /work/main/.venv/bin/python benchmarks/bench_core.py --only e2e > $log 2>&1 &
pid=$!
for i in $(seq 1 400); do
  if grep -q "e2e/cluster: [0-9]* tokens in" $log; then break; fi
  if ! kill -0 $pid 2>/dev/null; then break; fi
  sleep 1
done
sleep 8  # let the cluster stop cleanly
pkill -P $pid 2>/dev/null; kill $pid 2>/dev/null; wait $pid 2>/dev/null
pkill -f "$wt" 2>/dev/null
echo "$c $(git log -1 --format='%ad %s' --date=format:'%m-%d %H:%M' | cut -c1-70)"
grep "e2e/cluster: [0-9]* tokens in" $log || tail -5 $log
