#!/usr/bin/env bash
# The toy reproduction (results/README.md, "What remains"): the plan's data, trainings and
# evaluations, in two lanes that run side by side with one thread each (2-core CPU). Safe to
# rerun: a lane skips every model already trained (runs/*/final) and every cell whose summary
# is already in results/, so a killed session continues where it stopped.
#
#   bash results/repro.sh            # both lanes: the 2K cells
#   bash results/repro.sh a          # one lane only (a: logo + base, b: sft + rope)
#
# Logs go to runs/repro_logs/. Commit results/*.json as they land; no weights go there.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1                           # two jobs on two cores
DATA=data/repro
LOGS=runs/repro_logs
mkdir -p "$LOGS"

# Training data: the demo's rows (8 chunks x 128 tokens over 16K positions), 96 records, seed 0.
if [ ! -f "$DATA/meta.json" ]; then
    python prepare.py --num_samples 96 --num_chunks 8 --out_dir "$DATA" > "$LOGS/prepare.log" 2>&1
fi

# One model: METHOD (logo | sft) and SEED; the same steps, lr and LoRA for every one.
train() {
    local method=$1 seed=$2 out=runs/$1_s$2 how=(--overwrite) loss=()
    [ -d "$out/final" ] && return 0
    compgen -G "$out/checkpoints/step_*" > /dev/null && how=(--resume)
    [ "$method" = sft ] && loss=(--loss sft)
    python train.py --data_dir "$DATA" --max_steps 48 --lr 1e-3 --warmup_steps 2 --save_every 16 \
        --seed "$seed" --out_dir "$out" "${loss[@]}" "${how[@]}" > "$LOGS/train_$1_s$2.log" 2>&1
}

# QA at 2K: 100 held-out questions of seed 5678. NAME: the summary's name stem; the rest:
# evaluate.py's model arguments.
qa2k() {
    local name=$1; shift
    [ -f "results/${name}_qa_2K_e5678.json" ] && return 0
    python evaluate.py --task qa --lengths 2K --max_samples 100 --seed 5678 --gen_batch 4 \
        --results_dir results --out_dir "runs/eval/${name}_qa_2K" "$@" > "$LOGS/qa2k_$name.log" 2>&1
}

lane_a() {
    train logo 0 && qa2k logo_s0 --adapter runs/logo_s0/final
    qa2k base
    for s in 1 2; do train logo $s && qa2k logo_s$s --adapter runs/logo_s$s/final; done
}
lane_b() {
    train sft 0 && qa2k sft_s0 --adapter runs/sft_s0/final
    qa2k rope --rope_theta 2.5e5
    for s in 1 2; do train sft $s && qa2k sft_s$s --adapter runs/sft_s$s/final; done
}

case "${1:-both}" in
    a) lane_a ;;
    b) lane_b ;;
    both) lane_a & a=$!; lane_b & b=$!; wait $a; wait $b ;;
    *) echo "usage: bash results/repro.sh [a|b]" >&2; exit 2 ;;
esac
