#!/bin/bash
# For each issue-25 commit: the DES phase-shift comparison at its parent and at it; prints whether compare.json matches.
cd /tmp/steps
for c in fcbfc88 745edfe 8395e24 934bf73 8cfbe39 76e9967 55c74b2 bc04c1a; do
  for rev in $c^ $c; do
    name=$(git -C /work/main rev-parse --short $rev)
    wt=/tmp/steps/wt-$name
    [ -d $wt ] || git -C /work/main worktree add -q --detach $wt $rev
    [ -f /tmp/steps/out-$name/compare.json ] || (cd $wt && PYTHONPATH=$wt timeout 900 /work/main/.venv/bin/python -m services.cli bench compare --modes aggregated,static,dopd,dopd-no-planner --engine des --profile llama3-8b-h100 --workers 16 --no-progress --workload phase-shift --rate 26 --burstiness 0.5 --duration 60 --max-context 8192 --kv-blocks 4096 --max-batch-size 256 --prefill-token-budget 8192 --slo-ttft 300 --slo-tpot 40 --out /tmp/steps/out-$name > /tmp/steps/log-$name 2>&1)
  done
  p=$(git -C /work/main rev-parse --short $c^); q=$(git -C /work/main rev-parse --short $c)
  python3 - "$p" "$q" <<'PY'
import json, sys
def load(n):
    try:
        d = json.load(open(f"/tmp/steps/out-{n}/compare.json"))
    except Exception as e:
        return f"missing ({e})"
    d.pop("command", None)
    s = json.dumps(d, sort_keys=True)
    import re
    return re.sub(r'"(wall_s|cpu_s|sim_to_wall|decision_seconds|host)": [^,}]*', '', s).replace(n, "X")
a, b = load(sys.argv[1]), load(sys.argv[2])
print(f"{sys.argv[1]} -> {sys.argv[2]}: {'identical' if a == b else 'DIFFERENT'}")
PY
done
