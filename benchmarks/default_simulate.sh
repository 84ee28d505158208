#!/usr/bin/env bash
# Wall time of the default `fedcare simulate` (built-in breast-cancer DP scenario), N runs.
# Usage: bash benchmarks/default_simulate.sh [RUNS] [JSON_OUT]
# Prints one row per run (wall s, load average before/after) and writes JSON.
set -euo pipefail
RUNS=${1:-3}
OUT_JSON=${2:-benchmarks/results/default_simulate.json}
rows=()
printf '| run | wall s | load avg before (1/5/15 min) | load avg after |\n|---|---|---|---|\n'
for i in $(seq 1 "$RUNS"); do
  dir=$(mktemp -d /tmp/default-run.XXXX)
  rmdir "$dir"
  before=$(cut -d' ' -f1-3 /proc/loadavg)
  t0=$(date +%s.%N)
  timeout 900 fedcare simulate --out "$dir" >"$dir.log" 2>&1 || { echo "run $i failed, see $dir.log"; exit 1; }
  t1=$(date +%s.%N)
  after=$(cut -d' ' -f1-3 /proc/loadavg)
  wall=$(python -c "print(f'{$t1-$t0:.1f}')")
  printf '| %d | %s | %s | %s |\n' "$i" "$wall" "$before" "$after"
  rows+=("{\"run\": $i, \"wall_s\": $wall, \"loadavg_before\": \"$before\", \"loadavg_after\": \"$after\", \"out\": \"$dir\", \"summary\": $(cat "$dir/summary.json" | python -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({k: s[k] for k in ("wall_time_s","federated_time_s","final_global","gap_vs_pooled","rounds_completed")}))')}")
done
python - "$OUT_JSON" "${rows[@]}" <<'PY'
import json, platform, sys
runs = [json.loads(r) for r in sys.argv[2:]]
json.dump({"command": "fedcare simulate --out <tmp>", "machine": platform.platform(), "runs": runs},
          open(sys.argv[1], "w"), indent=2)
print("written", sys.argv[1])
PY
