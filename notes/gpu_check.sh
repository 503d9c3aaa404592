#!/usr/bin/env bash
# The ONE prepared GPU run. The workplace lends an H200 to some sessions only, 15 minutes of device
# time in all (start-up included) and at most 10 minutes a command, so this script stops starting
# new sections after BUDGET seconds (default 300; each section is capped at 120 s, so the
# script ends within ~7 minutes) and leaves room for one rerun.
# Run from the repository root on the GPU machine; everything lands in $OUT (default /tmp/gpu_out):
#   bash notes/gpu_check.sh
# 1. the CUDA tests: bf16 + torch.compile + fused attention, no host sync in a whole step
# 2. --bench: ViT-B/16 at 224, batch 128, 5 captions, compiled, bf16, fed by the shapes renderer:
#    I-JEPA vs TC-JEPA img/s, ms/step, peak memory, MFU against 989 TFLOP/s, recompilations
# 3. the COCO input pipeline against that step: the same I-JEPA benchmark fed by DataLoader
#    workers decoding COCO-sized JPEGs (a fixture in the COCO 2017 layout); data_wait_ms_per_step
#    near 0 means the loader keeps up
# 4. if time is left: TC-JEPA with the lighter conditioner (--cond_mlp_ratio 1)
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-300}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
EXTRA=${EXTRA:-}  # appended to every train.py command; a CPU dry run of this script:
# EXTRA="--device cpu --compile off --batch_size 2 --bench 1 --bench_warmup 1 --num_workers 1" bash notes/gpu_check.sh
left() { [ "$SECONDS" -lt "$BUDGET" ] || { echo "skipped (budget): $1" | tee -a "$OUT/bench.txt"; return 1; }; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())"
  git log --oneline -1
} 2>&1 | tee "$OUT/env.txt"

timeout 100 $PY -m pytest -q test_tcjepa.py -k "cuda or flops" 2>&1 | tail -15 | tee "$OUT/tests.txt"

VITB="--preset vit_b16 --img_size 224 --batch_size 128 --n_captions 5 --compile on --val_size 128"
for tc in none cross; do
  left "bench $tc" || break
  timeout 120 $PY train.py $VITB --text_cond $tc --bench 30 --bench_warmup 15 --num_workers 12 \
    --out_dir /tmp/bench_$tc $EXTRA 2>&1 | grep -E "^bench|Error|error" | tee -a "$OUT/bench.txt"
done

if left "coco loader"; then
  W=$(( $(nproc) - 2 ))
  $PY notes/perf.py --coco-fixture /tmp/coco_fix 400 \
    && timeout 120 $PY train.py $VITB --dataset coco --data_dir /tmp/coco_fix --text_cond none --bench 20 \
      --bench_warmup 10 --num_workers $W --out_dir /tmp/bench_coco $EXTRA 2>&1 | grep -E "^bench|Error|error" \
      | sed "s/^bench/bench coco_workers=$W/" | tee -a "$OUT/bench.txt"
fi

if left "cond_mlp_ratio 1"; then
  timeout 120 $PY train.py $VITB --text_cond cross --cond_mlp_ratio 1 --bench 30 --bench_warmup 15 \
    --num_workers 12 --out_dir /tmp/bench_mlp1 $EXTRA 2>&1 | grep -E "^bench|Error|error" \
    | sed "s/^bench/bench cond_mlp_ratio=1/" | tee -a "$OUT/bench.txt"
fi
echo "elapsed ${SECONDS}s" | tee -a "$OUT/bench.txt"
ls -la "$OUT"
