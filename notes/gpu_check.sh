#!/usr/bin/env bash
# The GPU measurements in one short script, sized for a few minutes on one GPU: it starts no new
# section after BUDGET seconds (default 240; each section is capped at 150 s, so the script ends
# within ~7 minutes), so twice fits in 15 minutes of GPU time. It writes at most 8 files.
# Run from the repository root on the GPU machine; everything lands in $OUT (default /tmp/gpu_out):
#   bash notes/gpu_check.sh
# 1. the CUDA tests: bf16 + torch.compile + fused attention, no host sync in a whole step
# 2. a canary: a tiny model, compiled with dynamic block sizes on CUDA, 20 steps; if it fails the
#    ViT-B sections run eagerly (--compile off) rather than fail the same way three times
# 3. notes/bench.py: ViT-B/16 at 224, batch 128, 5 captions, bf16, the step alone (--one_batch):
#    I-JEPA vs TC-JEPA img/s, ms/step, peak memory, MFU against 989 TFLOP/s, recompilations
# 4. the COCO input pipeline against that step: I-JEPA fed by DataLoader workers decoding a
#    COCO-layout fixture of 640x480 JPEGs (the default worker count); data_wait_ms_per_step near 0 =
#    the loader keeps up
# 5. if time is left: TC-JEPA with the lighter conditioner (--cond_mlp_ratio 1)
# bench.txt gets every section's result line and exit code; <section>.log the whole output.
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-240}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
EXTRA=${EXTRA:-}  # appended to every notes/bench.py command; a CPU dry run of this script:
# EXTRA="--device cpu --compile off --batch_size 2 --steps 1 --warmup 1 --num_workers 1" bash notes/gpu_check.sh
left() { [ "$SECONDS" -lt "$BUDGET" ] || { echo "skipped (budget): $1" | tee -a "$OUT/bench.txt"; return 1; }; }
section() {  # $1 = name, rest = notes/bench.py flags: full log to $OUT/$1.log, result line + rc to bench.txt
  local name=$1; shift
  timeout -k 10 150 $PY notes/bench.py "$@" --out_dir "/tmp/gpu_$name" $EXTRA > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(grep '^bench' "$OUT/$name.log" | tail -1)" | tee -a "$OUT/bench.txt"
  [ $rc -eq 0 ] || tail -5 "$OUT/$name.log" | tee -a "$OUT/bench.txt"
  return $rc
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, os; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cpus', os.cpu_count())"
  df -h /dev/shm
  git log --oneline -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout -k 10 120 $PY -m pytest -q -rA test_tcjepa.py -k "cuda or flops" > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/bench.txt"

COMPILE="--compile on"
section canary --width 64 --depth 2 --heads 2 --pred_width 32 --pred_depth 2 --text_width 32 --batch_size 32 \
  --shapes_size 2000 --val_size 32 --compile on --steps 20 --warmup 5 || COMPILE="--compile off"

SIZE="--img_size 224 --batch_size 128 --n_captions 5 --val_size 128 --shapes_size 2000 $COMPILE"
VITB="--preset vit_b16 $SIZE"  # the paper's model on the built-in data
for tc in none cross; do
  left "vitb_$tc" && section "vitb_$tc" $VITB --text_cond $tc --steps 30 --warmup 10 --one_batch
done

if left "coco"; then  # the coco preset's --num_workers: -1, auto (nproc - 1 here; the bench line says)
  $PY notes/perf.py --coco-fixture /tmp/coco_fix 400 \
    && section coco --preset coco $SIZE --data_dir /tmp/coco_fix --text_cond none --steps 20 --warmup 10
fi

left "vitb_mlp1" && section vitb_mlp1 $VITB --text_cond cross --cond_mlp_ratio 1 --steps 30 --warmup 10 \
  --one_batch
echo "elapsed ${SECONDS}s" | tee -a "$OUT/bench.txt"
ls -la "$OUT"
