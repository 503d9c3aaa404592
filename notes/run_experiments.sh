#!/usr/bin/env bash
# Reruns every experiment of notes/experiments.md on the built-in shapes data (CPU is enough).
# Two runs at a time, one thread each (the most throughput from a 2-core machine); a run whose
# log already ends with its probes is skipped and one with a checkpoint resumes from it, so the
# script can be restarted after a stop.
#   bash notes/run_experiments.sh            # all runs, into runs/
#   ONLY='^(tc|shuf)_s' bash notes/run_experiments.sh   # only the runs whose name matches
#   ONLY='^mech_' bash notes/run_experiments.sh          # the pre-registered test, notes/experiments.md §7
#   ONLY='^sim_' bash notes/run_experiments.sh           # the remedies of notes/experiments.md §9
#   ONLY='^c[12]_' bash notes/run_experiments.sh         # the two claims of notes/experiments.md §10
#   EXTRA='--device cuda' JOBS=4 ONLY='^mech_' bash notes/run_experiments.sh   # the same on a GPU
#   python notes/report.py runs              # sections 1-6's tables + notes/curves.png from runs/*/log.jsonl
#   python notes/report.py --claims runs     # one later section from runs/ (--mech, --dead, --sim, --claims)
# Protocol, fixed before looking at val numbers: default model (ViT 128x4, predictor 64x3), batch 64,
# 1500 steps (long_*: 4000, --preset shapes_long; mech_* and c1_*: 3000), lr 2e-3, EMA 0.99 constant,
# probes on the frozen target encoder. With no ONLY, all 92 runs: many hours (see each section).
set -u
cd "$(dirname "$0")/.."
COMMON="--lr 2e-3 --ema_start 0.99 --ema_end 0.99 --eval_every 500"  # + --max_steps 1500, or the preset's 4000
TC="--text_cond cross --sparse_coef 0 --consist_coef 0"      # TC-JEPA, regularizers off (see sweep)
# notes/experiments.md §7: 2 shapes in one colour on a 2x2 grid, two 4x4 target blocks, the rest is context
MECH="--shapes_layout pairs --n_targets 2 --target_scale 0.25 0.25 --target_aspect 1 1 --context_scale 1 1 \
--sparse_coef 0 --consist_coef 0 --max_steps 3000 --eval_every 1000 --save_every 500"
# notes/experiments.md §10: claim 1 on §7's data and masks, evaluated once at the end; claim 2 on the default data
C1="--shapes_layout pairs --shapes_captions complement --n_targets 2 --target_scale 0.25 0.25 --target_aspect 1 1 \
--context_scale 1 1 --max_steps 3000 --eval_every 3000 --save_every 500"
C2="--max_steps 1500 --eval_every 1500 --save_every 500"
runs=(
  # name                 flags
  "ijepa_s0              --text_cond none --seed 0"
  "tc_s0                 $TC --seed 0"
  "tc_paper_s0           --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 0"
  "tc_paper_nobias_s0    --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --qk_bias false --seed 0"  # §8
  "ijepa_s1              --text_cond none --seed 1"
  "tc_s1                 $TC --seed 1"
  "ijepa_s2              --text_cond none --seed 2"
  "tc_s2                 $TC --seed 2"
  "shuf_s0               $TC --shuffle_captions true --seed 0"
  "shuf_s1               $TC --shuffle_captions true --seed 1"
  "shuf_s2               $TC --shuffle_captions true --seed 2"
  "tc_onelayer_s0        $TC --cond_layers 1 --seed 0"
  "tc_meanpool_s0        $TC --text_pool mean --seed 0"
  "tc_small_s0           $TC --target_scale 0.1 0.15 --seed 0"
  "ijepa_small_s0        --text_cond none --target_scale 0.1 0.15 --seed 0"
  "tc_large_s0           $TC --target_scale 0.2 0.25 --seed 0"
  "ijepa_large_s0        --text_cond none --target_scale 0.2 0.25 --seed 0"
  # the long regime (--preset shapes_long = 4000 steps): I-JEPA and TC-JEPA, 3 seeds
  "long_ijepa_s0         --preset shapes_long --text_cond none --seed 0"
  "long_ijepa_s1         --preset shapes_long --text_cond none --seed 1"
  "long_ijepa_s2         --preset shapes_long --text_cond none --seed 2"
  "long_tc_s0            --preset shapes_long $TC --seed 0"
  "long_tc_s1            --preset shapes_long $TC --seed 1"
  "long_tc_s2            --preset shapes_long $TC --seed 2"
  "long_ijepa_ema_s0     --preset shapes_long --text_cond none --ema_start 0.996 --ema_end 1.0 --seed 0"
  # the lambda / beta plane between (0, 0) and the paper's (0.1, 0.5)
  "tc_sparse_s0          --text_cond cross --sparse_coef 0.1 --consist_coef 0 --seed 0"
  "tc_consist_s0         --text_cond cross --sparse_coef 0 --consist_coef 0.5 --seed 0"
  "tc_tenth_s0           --text_cond cross --sparse_coef 0.01 --consist_coef 0.05 --seed 0"
  # a lighter conditioner: MLP hidden = 1 x P instead of 4 x P (notes/perf.md, the TC/I step ratio)
  "tc_mlp1_s0            $TC --cond_mlp_ratio 1 --seed 0"
  "tc_mlp1_s1            $TC --cond_mlp_ratio 1 --seed 1"
  "tc_mlp1_s2            $TC --cond_mlp_ratio 1 --seed 2"
  # notes/experiments.md §7, pre-registered: complement vs substitute captions (most needed first)
  "mech_comp_s0          $MECH --shapes_captions complement --text_cond cross --seed 0"
  "mech_ijepa_s0         $MECH --shapes_captions complement --text_cond none --seed 0"
  "mech_comp_s1          $MECH --shapes_captions complement --text_cond cross --seed 1"
  "mech_ijepa_s1         $MECH --shapes_captions complement --text_cond none --seed 1"
  "mech_comp_s2          $MECH --shapes_captions complement --text_cond cross --seed 2"
  "mech_ijepa_s2         $MECH --shapes_captions complement --text_cond none --seed 2"
  "mech_sub_s0           $MECH --shapes_captions substitute --text_cond cross --seed 0"
  "mech_shuf_s0          $MECH --shapes_captions complement --text_cond cross --shuffle_captions true --seed 0"
  "mech_sub_s1           $MECH --shapes_captions substitute --text_cond cross --seed 1"
  "mech_shuf_s1          $MECH --shapes_captions complement --text_cond cross --shuffle_captions true --seed 1"
  # notes/experiments.md §9, pre-registered: remedies for the loss's trivial minima (1500 steps, seeds 0-1)
  "sim_paper_s0          --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 0"
  "sim_zero_s0           --text_cond cross --sparse_coef 0 --consist_coef 0 --seed 0"
  "sim_cosine_s0         --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --sim_mode cosine --seed 0"
  "sim_attn_s0           --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --sim_mode attention --seed 0"
  "sim_paper_s1          --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 1"
  "sim_zero_s1           --text_cond cross --sparse_coef 0 --consist_coef 0 --seed 1"
  "sim_cosine_s1         --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --sim_mode cosine --seed 1"
  "sim_attn_s1           --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --sim_mode attention --seed 1"
  # notes/experiments.md §10, pre-registered: claim 1 (pairs, complement captions, 3000 steps, 10 paired seeds)
  "c1_tc_s0              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 0"
  "c1_ijepa_s0           $C1 --text_cond none --seed 0"
  "c1_tc_s1              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 1"
  "c1_ijepa_s1           $C1 --text_cond none --seed 1"
  "c1_tc_s2              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 2"
  "c1_ijepa_s2           $C1 --text_cond none --seed 2"
  "c1_tc_s3              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 3"
  "c1_ijepa_s3           $C1 --text_cond none --seed 3"
  "c1_tc_s4              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 4"
  "c1_ijepa_s4           $C1 --text_cond none --seed 4"
  "c1_tc_s5              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 5"
  "c1_ijepa_s5           $C1 --text_cond none --seed 5"
  "c1_tc_s6              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 6"
  "c1_ijepa_s6           $C1 --text_cond none --seed 6"
  "c1_tc_s7              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 7"
  "c1_ijepa_s7           $C1 --text_cond none --seed 7"
  "c1_tc_s8              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 8"
  "c1_ijepa_s8           $C1 --text_cond none --seed 8"
  "c1_tc_s9              $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 9"
  "c1_ijepa_s9           $C1 --text_cond none --seed 9"
  "c1_zero_s0            $C1 --text_cond cross --sparse_coef 0 --consist_coef 0 --seed 0"
  "c1_shuf_s0            $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --shuffle_captions true --seed 0"
  "c1_zero_s1            $C1 --text_cond cross --sparse_coef 0 --consist_coef 0 --seed 1"
  "c1_shuf_s1            $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --shuffle_captions true --seed 1"
  "c1_zero_s2            $C1 --text_cond cross --sparse_coef 0 --consist_coef 0 --seed 2"
  "c1_shuf_s2            $C1 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --shuffle_captions true --seed 2"
  # §10 claim 2: block scales on the default data, 1500 steps, 3 seeds
  "c2_ijepa_easy_s0  $C2 --target_scale 0.1 0.15 --text_cond none --seed 0"
  "c2_tc_easy_s0     $C2 --target_scale 0.1 0.15 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 0"
  "c2_ijepa_default_s0  $C2 --target_scale 0.15 0.2 --text_cond none --seed 0"
  "c2_tc_default_s0     $C2 --target_scale 0.15 0.2 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 0"
  "c2_ijepa_hard_s0  $C2 --target_scale 0.3 0.4 --text_cond none --seed 0"
  "c2_tc_hard_s0     $C2 --target_scale 0.3 0.4 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 0"
  "c2_ijepa_easy_s1  $C2 --target_scale 0.1 0.15 --text_cond none --seed 1"
  "c2_tc_easy_s1     $C2 --target_scale 0.1 0.15 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 1"
  "c2_ijepa_default_s1  $C2 --target_scale 0.15 0.2 --text_cond none --seed 1"
  "c2_tc_default_s1     $C2 --target_scale 0.15 0.2 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 1"
  "c2_ijepa_hard_s1  $C2 --target_scale 0.3 0.4 --text_cond none --seed 1"
  "c2_tc_hard_s1     $C2 --target_scale 0.3 0.4 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 1"
  "c2_ijepa_easy_s2  $C2 --target_scale 0.1 0.15 --text_cond none --seed 2"
  "c2_tc_easy_s2     $C2 --target_scale 0.1 0.15 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 2"
  "c2_ijepa_default_s2  $C2 --target_scale 0.15 0.2 --text_cond none --seed 2"
  "c2_tc_default_s2     $C2 --target_scale 0.15 0.2 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 2"
  "c2_ijepa_hard_s2  $C2 --target_scale 0.3 0.4 --text_cond none --seed 2"
  "c2_tc_hard_s2     $C2 --target_scale 0.3 0.4 --text_cond cross --sparse_coef 0.1 --consist_coef 0.5 --seed 2"
)
one() {  # $1 = name, rest = flags
  local name=$1; shift
  [[ "$name" =~ ${ONLY:-.} ]] || return 0
  if [ -f "runs/$name/log.jsonl" ] && grep -q init_probes "runs/$name/log.jsonl"; then echo "skip $name"; return; fi
  if pgrep -f -- "--out_dir runs/$name\$" > /dev/null; then  # started by an earlier driver: wait for it
    echo "wait $name"; while pgrep -f -- "--out_dir runs/$name\$" > /dev/null; do sleep 10; done; return
  fi
  local budget="--max_steps 1500" resume=""
  [[ " $* " == *" shapes_long "* ]] && budget=""  # the preset sets 4000 steps
  if [ -f "runs/$name/ckpt.pt" ]; then resume="--resume auto"; else rm -rf "runs/$name"; mkdir -p "runs/$name"; fi
  echo "start $name: python train.py $COMMON $budget $* ${EXTRA:-} $resume --out_dir runs/$name"
  OMP_NUM_THREADS=1 python train.py $COMMON $budget "$@" ${EXTRA:-} $resume --out_dir "runs/$name" >> "runs/$name/stdout.txt" 2>&1
  echo "done  $name ($(tail -c 300 runs/$name/stdout.txt | tr '\r' '\n' | tail -1))"
}
export -f one; export COMMON ONLY EXTRA
printf '%s\n' "${runs[@]}" | xargs -P "${JOBS:-2}" -I{} bash -c 'one {}'
