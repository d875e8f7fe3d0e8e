#!/usr/bin/env bash
# The objective experiment (results/README.md, "The objective experiment"): LOGO with lambda = 1
# against SFT on hard rejected answers, 5 training seeds each, the lr chosen first on a
# validation seed. Every step is skipped when its output exists, so a killed session continues
# where it stopped; jobs run two at a time with one thread each (2-core CPU).
#
#   bash results/objective.sh grid       # data/hard, then per primary arm 3 lrs x seed 0 and
#                                        # their validation cells (QA 2K, 40 questions, seed 999)
#   bash results/objective.sh primary    # seeds 1-4 of sft and logo-l1 at the chosen lr, then
#                                        # the 12K endpoint (40 questions, seed 2468), QA 2K
#                                        # (100 questions, seed 5678) and perplexity (PG essays)
#   bash results/objective.sh primary 0 1  # only these training seeds (weights are not kept
#                                        # between sessions: train and evaluate in one)
#   bash results/objective.sh secondary  # logo-l01 and logo-ref, seeds 0-2: QA 2K, perplexity
#   bash results/objective.sh context    # the untrained model at the trained rope_theta, same cells
#
# Summaries go to results/objective/ARM/ (grid: results/objective/grid/ARM_lrLR/), with the
# training summaries under train/ and the 12K answers under answers/ as they are generated:
# commit results/objective before a session ends. Weights and logs stay in runs/obj/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
DATA=data/hard RES=results/objective RUNS=runs/obj LOGS=runs/obj/logs
LRS=(3e-4 1e-3 3e-3)
mkdir -p "$LOGS"

data() {
    [ -f $DATA/meta.json ] || python prepare.py --num_samples 96 --num_chunks 8 --out_dir $DATA \
        --rejected_kinds similar,similar > $LOGS/prepare.log 2>&1
}

arm_flags() {                        # the only differences between the arms
    case $1 in
        sft) echo --loss sft ;;
        logo-l1) echo --sft_weight 1 ;;
        logo-l01) echo --sft_weight 0.1 ;;
        logo-ref) echo --sft_weight 1 --reference ;;
        *) echo "unknown arm $1" >&2; return 1 ;;
    esac
}

method() { [ "$1" = sft ] && echo sft || echo logo; }     # evaluate.py's name for the adapter

# train ARM LR SEED RESULTS: runs/obj/ARM_lrLR_sSEED; its summary into RESULTS/train/
train() {
    local out=$RUNS/$1_lr$2_s$3 how=(--overwrite) flags
    flags=$(arm_flags "$1")
    if [ ! -d "$out/final" ]; then
        compgen -G "$out/checkpoints/step_*" > /dev/null && how=(--resume)
        python train.py --data_dir $DATA --max_steps 48 --lr "$2" --warmup_steps 2 --save_every 16 \
            --seed "$3" --out_dir "$out" $flags "${how[@]}" > "$LOGS/train_${out##*/}.log" 2>&1
    fi
    python results/train_summary.py "$out" --results_dir "$4" >> "$LOGS/train_${out##*/}.log"
}

# cell RESULTS ARM SEED ADAPTER KIND: one evaluation summary (KIND: val, 2k, 12k, ppl); ADAPTER
# "-" evaluates the untrained model at the trained rope_theta (arm "context")
cell() {
    local res=$1 name kind=$5 model=(--adapter "$4") args f
    name=$(method "$2")_s$3
    [ "$4" = - ] && model=(--rope_theta 2.5e5) name=rope
    case $kind in
        val) args=(--task qa --lengths 2K --max_samples 40 --seed 999 --gen_batch 4) f=qa_2K_e999 ;;
        2k) args=(--task qa --lengths 2K --max_samples 100 --seed 5678 --gen_batch 4) f=qa_2K_e5678 ;;
        12k) args=(--task qa --lengths 12K --max_samples 40 --seed 2468) f=qa_12K_e2468 ;;
        ppl) args=(--task ppl --lengths 2K,8K --text ../shared/data/pg_essays) f=ppl_2K-8K_pg-essays ;;
    esac
    [ -f "$res/${name}_$f.json" ] && return 0
    [ "$kind" = ppl ] || args+=(--answers "$res/answers/${name}_$f.jsonl")
    mkdir -p "$res/answers"
    python evaluate.py "${args[@]}" "${model[@]}" --results_dir "$res" \
        --out_dir "$RUNS/eval/${res#$RES/}_${name}_$f" > "$LOGS/eval_${res//\//-}_${name}_$f.log" 2>&1
}

grid_job() {                         # ARM LR: seed 0 trained and validated
    local res=$RES/grid/$1_lr$2
    train "$1" "$2" 0 "$res" && cell "$res" "$1" 0 "$RUNS/$1_lr$2_s0/final" val
}

chosen_lr() {                        # highest validation accuracy; ties to the lower lr
    python - "$1" "${LRS[@]}" <<'EOF'
import glob, json, sys
arm, lrs = sys.argv[1], sorted(sys.argv[2:], key=float)
acc = {}
for lr in lrs:
    files = glob.glob(f"results/objective/grid/{arm}_lr{lr}/*_qa_2K_e999.json")
    if len(files) != 1:
        sys.exit(f"{arm} lr {lr}: validation summary missing (run: bash results/objective.sh grid)")
    acc[lr] = json.load(open(files[0]))["metrics"]["accuracy"]
print(max(lrs, key=acc.get))         # max keeps the first of equal values: the lower lr
EOF
}

model_job() {                        # ARM SEED KIND...: train (or reuse) one model, then its cells
    local arm=$1 seed=$2 lr kind
    shift 2
    lr=$(chosen_lr "$( [ "$arm" = sft ] && echo sft || echo logo-l1 )")
    train "$arm" "$lr" "$seed" "$RES/$arm"
    for kind in "$@"; do cell "$RES/$arm" "$arm" "$seed" "$RUNS/${arm}_lr${lr}_s${seed}/final" "$kind"; done
}

# run JOB...: each job is one quoted command line; two at a time, the next starting as one ends
run() {
    export -f data arm_flags method train cell grid_job chosen_lr model_job
    export DATA RES RUNS LOGS LRS_LIST="${LRS[*]}"
    printf '%s\n' "$@" | xargs -P 2 -I{} bash -c 'set -euo pipefail; LRS=($LRS_LIST); {} || { echo "FAILED: {}" >&2; exit 1; }'
}

case "${1:-}" in
    grid) data
          jobs=(); for lr in "${LRS[@]}"; do jobs+=("grid_job sft $lr" "grid_job logo-l1 $lr"); done
          run "${jobs[@]}"
          echo "chosen lr: sft $(chosen_lr sft), logo-l1 $(chosen_lr logo-l1)" ;;
    primary) data
          seeds=("${@:2}"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2 3 4)
          # trainings first (a 12K cell is 40-80 min: the next session continues it from answers/)
          jobs=(); for s in "${seeds[@]}"; do jobs+=("model_job sft $s" "model_job logo-l1 $s"); done
          run "${jobs[@]}"
          jobs=(); for s in "${seeds[@]}"; do jobs+=("model_job sft $s 12k" "model_job logo-l1 $s 12k"); done
          run "${jobs[@]}"
          jobs=(); for s in "${seeds[@]}"; do jobs+=("model_job sft $s 2k ppl" "model_job logo-l1 $s 2k ppl"); done
          run "${jobs[@]}" ;;
    secondary) data
          jobs=(); for s in 0 1 2; do jobs+=("model_job logo-l01 $s 2k ppl" "model_job logo-ref $s 2k ppl"); done
          run "${jobs[@]}" ;;
    context) run "cell $RES/context context 0 - 12k" "cell $RES/context context 0 - 2k" \
                 "cell $RES/context context 0 - ppl" ;;
    *) echo "usage: bash results/objective.sh grid|primary|secondary|context" >&2; exit 2 ;;
esac
