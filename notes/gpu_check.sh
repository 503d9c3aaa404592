#!/usr/bin/env bash
# The ONE prepared GPU run (the workplace lends an H200 for 15 minutes in all to some sessions).
# Run from the repository root on the GPU machine; writes everything to $OUT (default /tmp/gpu_out):
#   bash notes/gpu_check.sh
# 1. the CUDA tests (bf16 + torch.compile + fused attention + no host sync in the step)
# 2. --bench: ViT-B/16 at 224, batch 128, 5 captions, I-JEPA vs TC-JEPA, compiled, bf16
#    (img/s, ms/step, peak memory, MFU against 989 TFLOP/s, recompilations after warm-up)
# 3. the longest evidence runs that fit: the shapes main comparison, 4x the CPU steps
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  git log --oneline -1
} 2>&1 | tee "$OUT/env.txt"

timeout 240 $PY -m pytest -q test_tcjepa.py -k "cuda or compile or flops" 2>&1 | tee "$OUT/tests.txt"

for tc in none cross; do  # the shapes renderer feeds the ViT-B benchmark at 224 px from 12 workers
  timeout 200 $PY train.py --preset vit_b16 --img_size 224 --batch_size 128 --n_captions 5 --text_cond $tc \
    --compile on --bench 40 --bench_warmup 15 --num_workers 12 --out_dir /tmp/bench_$tc 2>&1 \
    | grep -E "^bench|Error|error" | tee -a "$OUT/bench.txt"
done

# evidence: I-JEPA vs TC-JEPA vs shuffled captions, 4x the CPU steps, one seed each (at most 8 files
# come back from $OUT: keep only the logs)
for run in "ijepa --text_cond none" "tc --sparse_coef 0 --consist_coef 0" \
           "shuf --sparse_coef 0 --consist_coef 0 --shuffle_captions true"; do
  set -- $run; name=$1; shift
  timeout 150 $PY train.py --max_steps 6000 --batch_size 64 --eval_every 2000 --log_every 250 \
    --num_workers 4 "$@" --out_dir "/tmp/gpu_$name" > /dev/null 2>&1
  cp "/tmp/gpu_$name/log.jsonl" "$OUT/${name}_log.jsonl"
done
ls -la "$OUT"
