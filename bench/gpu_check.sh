#!/usr/bin/env bash
# Every GPU benchmark and the GPU-only tests in one go, for whoever is lent a GPU (one H100 / H200: under
# 8 minutes by the sizes below), then one JSON and one markdown table (bench/gpu_check_table.py):
#
#   bench/gpu_check.sh [--out DIR]             # on the GPU: DIR defaults to bench/results/gpu_check
#   bench/gpu_check.sh --dry-run [--out DIR]   # every step at tiny sizes on the CPU, the same table (CI, tests)
#
# Steps: engine / plain loop, DeiT-S MFU and ToE measured / theoretical per stage and ToE's last stage
# against no method (step_throughput, DeiT-S); DeiT-B MFU (step_throughput, DeiT-B); DALI images/s
# (data_throughput --device gpu); end to end with and without ToE (launcher.train on JPEG shards); Tri-Level
# attention with its mask (trilevel_attention); the ToE op's cost (toe_overhead); bf16 with fp32 gradients
# against bf16 gradients (grad_precision); the GPU-only tests (pytest: those that skip without CUDA). A step that fails is
# recorded with its exit code and the next one runs; the script exits 1 if any failed.
set -u
cd "$(dirname "$0")/.."
DRY=0
OUT=bench/results/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bench/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
mkdir -p "$OUT/logs"
: > "$OUT/steps.tsv"

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU, also on a machine with a GPU
  TINY=deit_tiny_patch16_224
  STEP_S="--model $TINY --batch 2 --rounds 1 --steps-per-round 1"
  STEP_B="--model $TINY --batch 2 --rounds 1 --steps-per-round 1"
  DATA="--device cpu --images 32 --batch 8 --size 64 --rounds 1"
  E2E="--model $TINY --batch 4 --steps 2 --images 32"
  TRI="--model $TINY --device cpu --batch 2 --rounds 1 --warmup 0"
  TOE="--model $TINY --device cpu --batch 2 --rounds 1 --warmup 0"
  GRADS="--model $TINY --batch 2 --accum 2 --rounds 1 --stages 1"
  LIMIT=300
else
  STEP_S="--model deit_small_patch16_224 --rounds 10"
  STEP_B="--model deit_base_patch16_224 --rounds 10"
  DATA="--device gpu --images 2048 --batch 256 --workers 4 --dali-threads 4 --no-imagefolder --rounds 2"
  E2E="--model deit_small_patch16_224 --steps 300 --workers 6"
  TRI="--device cuda --batch 128 --dtype bf16 --rounds 10"
  TOE="--device cuda --batch 128 --dtype bf16 --rounds 10"
  GRADS="--model deit_small_patch16_224 --batch 128 --accum 2 --rounds 10"
  LIMIT=240
fi

step() {  # name, then the command; its JSON goes to $OUT/name.json
  local name=$1; shift
  local start=$SECONDS
  timeout "$LIMIT" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  echo "gpu_check: $name: exit $rc in $((SECONDS - start)) s (log: $OUT/logs/$name.log)"
}

step step_deit_s $PY bench/step_throughput.py $STEP_S --out "$OUT/step_deit_s.json"
step step_deit_b $PY bench/step_throughput.py $STEP_B --out "$OUT/step_deit_b.json"
step dali $PY bench/data_throughput.py $DATA --out "$OUT/dali.json"
step end_to_end $PY bench/step_throughput.py --end-to-end $E2E --out "$OUT/end_to_end.json"
step trilevel_attention $PY bench/trilevel_attention.py $TRI --out "$OUT/trilevel_attention.json"
step toe_overhead $PY bench/toe_overhead.py $TOE --out "$OUT/toe_overhead.json"
step grad_precision $PY bench/grad_precision.py $GRADS --out "$OUT/grad_precision.json"
# the tests that skip without CUDA (on the CPU they report as skipped)
step gpu_tests $PY -m pytest -q -p no:cacheprovider -rs --junitxml "$OUT/gpu_tests.xml" \
  tests/test_dali.py::test_the_gpu_pipeline_gives_the_cpu_pipelines_batches

$PY bench/gpu_check_table.py "$OUT" $([ "$DRY" = 1 ] && echo --dry-run)
