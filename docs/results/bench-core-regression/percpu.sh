#!/bin/bash
# run_e2e.sh COMMIT while sampling every process's CPU (by its module) each 0.5 s
c=$1
( while true; do for p in /proc/[0-9]*; do cmd=$(tr '\0' ' ' < $p/cmdline 2>/dev/null); case "$cmd" in *"-m services."*) st=$(cat $p/stat 2>/dev/null) && echo "$(basename $p) $(echo $cmd | grep -o 'services\.[a-z]*') $(echo "$st" | awk '{print $14+$15}')";; esac; done; sleep 0.5; done > /tmp/bisect/cpu-$c.samples ) &
sampler=$!
/tmp/bisect/run_e2e.sh $c | tail -1
kill $sampler
python3 - $c <<'PY'
import sys, collections, os
last = {}
for line in open(f"/tmp/bisect/cpu-{sys.argv[1]}.samples"):
    pid, mod, ticks = line.split()
    last[(pid, mod)] = int(ticks)
by = collections.Counter()
for (pid, mod), t in last.items():
    by[mod] += t / os.sysconf("SC_CLK_TCK")
print(sys.argv[1], {k: round(v, 1) for k, v in sorted(by.items())})
PY
