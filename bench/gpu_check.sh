#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks; short table last, details under $OUT.
# usage: bash bench/gpu_check.sh [quick|full]
set -uo pipefail
MODE=${1:-quick}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/tests.log"
python3 -m pytest -q -x -n 4 tests/gpu 2>&1 | tee -a "$OUT/tests.log" | tail -15
MH="python3 -m modelhive.cli.main bench"
if [ "$MODE" = quick ]; then
  python3 bench/gpu_profile.py tinyllama-1.1b 1 2>&1 | tee "$OUT/profile.log" | head -60
  python3 bench/gpu_profile.py qwen2.5-0.5b 64 2>&1 | tee -a "$OUT/profile.log" | head -45
  $MH latency --model preset:tinyllama-1.1b --batch-size 1 --batch-size 32 --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log"
  $MH three-models --rounds 3 --json "$OUT/three.json" 2>&1 | tee "$OUT/three.log"
  $MH throughput --num-requests 64 --baseline-tokens 32 --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
else
  $MH latency --model preset:tinyllama-1.1b --model preset:qwen2.5-3b --model preset:yi-6b \
     --batch-size 1 --batch-size 32 --json "$OUT/latency.json" --plot "$OUT/latency.png" 2>&1 | tee "$OUT/latency.log"
  $MH three-models --json "$OUT/three.json" 2>&1 | tee "$OUT/three.log"
  $MH throughput --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
fi
echo "=== summary ==="
tail -2 "$OUT/tests.log"
grep -h "^#\|^latency\|^three-models\|^throughput\|decode step\|graph replay" "$OUT"/*.log
