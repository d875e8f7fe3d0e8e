#!/usr/bin/env bash
# The toy reproduction (results/README.md, "What remains"): the plan's data, trainings and
# evaluations, in two lanes that run side by side with one thread each (2-core CPU). Safe to
# rerun: a lane skips every model already trained (runs/*/final) and every cell whose summary
# is already in results/, so a killed session continues where it stopped.
#
#   bash results/repro.sh            # both lanes: the 2K cells
#   bash results/repro.sh a          # one lane only (a: logo + base, b: sft + rope)
#   bash results/repro.sh 12k        # then the 12K cells and perplexity, two models at a time
#                                    # (~2 core-minutes per 12K question: several sessions)
#   bash results/repro.sh 12k base rope   # only these models' 12K cells; a trained one
#   bash results/repro.sh 12k logo_s0 sft_s0  # with no runs/NAME/final is trained first (and
#                                    # train_summary.py says whether it is the same run as
#                                    # the one in results/train/, evaluated before)
#   bash results/repro.sh m3         # LOGO with M = 3 rejected answers (m1: M = 1), seeds 0-2:
#                                    # its own data (data/repro_m3), the same training, QA 2K
#
# Logs go to runs/repro_logs/. Commit results/*.json as they land; no weights go there.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1                           # two jobs on two cores
DATA=data/repro
LOGS=runs/repro_logs
mkdir -p "$LOGS"

# Training data: 8 chunks x 128 tokens over 16K positions (the demo's rows until it moved to 4), 96 records, seed 0.
# data [DIR PREPARE_ARGS...]: another directory for an M variant (--num_rejected M).
data() {
    local dir=${1:-$DATA}; [ $# -gt 0 ] && shift
    [ -f "$dir/meta.json" ] && return 0
    python prepare.py --num_samples 96 --num_chunks 8 --out_dir "$dir" "$@" \
        > "$LOGS/prepare_${dir##*/}.log" 2>&1
}

# One model: METHOD (logo | sft | logo_mM) and SEED; the same steps, lr and LoRA for every one
# (logo_mM: LOGO on data/repro_mM, whose records have M rejected answers).
train() {
    local method=$1 seed=$2 out=runs/$1_s$2 how=(--overwrite) loss=() dir=$DATA
    [ -d "$out/final" ] && return 0
    compgen -G "$out/checkpoints/step_*" > /dev/null && how=(--resume)
    [ "$method" = sft ] && loss=(--loss sft)
    [[ $method == logo_m* ]] && dir=data/repro_${method#logo_}
    python train.py --data_dir "$dir" --max_steps 48 --lr 1e-3 --warmup_steps 2 --save_every 16 \
        --seed "$seed" --out_dir "$out" "${loss[@]}" "${how[@]}" > "$LOGS/train_$1_s$2.log" 2>&1
    python results/train_summary.py "$out" | tee -a "$LOGS/train_$1_s$2.log"   # results/train/
}

# QA at 2K: 100 held-out questions of seed 5678. NAME: the summary's name stem; the rest:
# evaluate.py's model arguments.
qa2k() {
    local name=$1; shift
    [ -f "results/${name}_qa_2K_e5678.json" ] && return 0
    python evaluate.py --task qa --lengths 2K --max_samples 100 --seed 5678 --gen_batch 4 \
        --results_dir results --out_dir "runs/eval/${name}_qa_2K" "$@" > "$LOGS/qa2k_$name.log" 2>&1
}

# The costly cells of one model: QA 12K (50 questions of seed 4321), MV-NIAH 12K (20 samples,
# 4 values each), perplexity on the Paul Graham essays at 2K and 8K (needs ../shared/data).
# The 12K answers go to results/answers/ as they are generated: commit that folder before a
# session ends and the next one continues a cell where it stopped (a cell is hours of CPU).
cells12k() {
    local name=$1; shift
    [ -f "results/${name}_qa_12K_e4321.json" ] || python evaluate.py --task qa --lengths 12K \
        --max_samples 50 --seed 4321 --results_dir results \
        --answers "results/answers/${name}_qa_12K_e4321.jsonl" \
        --out_dir "runs/eval/${name}_qa_12K" "$@" > "$LOGS/qa12k_$name.log" 2>&1
    [ -f "results/${name}_mvniah_12K_e4321.json" ] || python evaluate.py --task mvniah \
        --lengths 12K --max_samples 20 --seed 4321 --results_dir results \
        --answers "results/answers/${name}_mvniah_12K_e4321.jsonl" \
        --out_dir "runs/eval/${name}_mvniah_12K" "$@" > "$LOGS/mvniah12k_$name.log" 2>&1
    [ -f "results/${name}_ppl_2K-8K_pg-essays.json" ] || python evaluate.py --task ppl \
        --lengths 2K,8K --text ../shared/data/pg_essays --results_dir results \
        --out_dir "runs/eval/${name}_ppl" "$@" > "$LOGS/ppl_$name.log" 2>&1
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

lane_12k() {                                       # $1: 0 or 1, which half of the models
    local i name
    for ((i = $1; i < ${#MODELS[@]}; i += 2)); do
        name=${MODELS[i]}
        case $name in
            base) cells12k base ;;
            rope) cells12k rope --rope_theta 2.5e5 ;;
            *) train "${name%_s*}" "${name##*_s}" && cells12k "$name" --adapter "runs/$name/final" ;;
        esac
    done
}

# An M variant's three seeds in three rounds of two jobs: train s0 and s1; train s2 while s0 is
# evaluated; evaluate s1 and s2.
lane_m() {                                         # $1: m1 or m3
    local v=logo_$1 a b
    data "data/repro_$1" --num_rejected "${1#m}"
    train "$v" 0 & a=$!; train "$v" 1 & b=$!; wait $a; wait $b
    train "$v" 2 & a=$!; qa2k "${v}_s0" --adapter "runs/${v}_s0/final" & b=$!; wait $a; wait $b
    qa2k "${v}_s1" --adapter "runs/${v}_s1/final" & a=$!
    qa2k "${v}_s2" --adapter "runs/${v}_s2/final" & b=$!; wait $a; wait $b
}

case "${1:-both}" in
    a) data && lane_a ;;
    b) data && lane_b ;;
    12k) shift; MODELS=("$@")
         [ $# -gt 0 ] || MODELS=(base rope logo_s0 sft_s0 logo_s1 sft_s1 logo_s2 sft_s2)
         for name in "${MODELS[@]}"; do            # a trained model with no adapter: train it
             case $name in base|rope) ;; *) [ -d "runs/$name/final" ] || data ;; esac
         done
         lane_12k 0 & a=$!; lane_12k 1 & b=$!; wait $a; wait $b ;;
    both) data; lane_a & a=$!; lane_b & b=$!; wait $a; wait $b ;;
    m1|m3) lane_m "$1" ;;
    *) echo "usage: bash results/repro.sh [a|b|12k|m1|m3]" >&2; exit 2 ;;
esac
