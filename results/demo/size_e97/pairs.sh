#!/usr/bin/env bash
# The demo-size runs on evaluation seed 97 (results/README.md, "The demo's size"), base vs
# adapter per run: c<N> = N chunks x 128 tokens, training seed 0; c4s1 / c4s2: training seeds
# 1 / 2 on c4's data (c4's base); c4avx: c4 under AVX2 kernels. "run" is the adapter.
cd "$(dirname "$0")"
pair() { python ../../make_table.py --pair "$2" "$3" | tail -n "$4" | sed "s/^ */$1  /"; }
for c in c8 c6 c5 c4; do pair $c ${c}_base_*.json ${c}_logo_s0_*.json 3; done
pair c4s1 c4_base_qa_512_e97.json c4s1_logo_s1_qa_512_e97.json 2
pair c4s2 c4_base_qa_512_e97.json c4s2_logo_s2_qa_512_e97.json 2
pair c4avx c4avx_base_qa_512_e97.json c4avx_logo_s0_qa_512_e97.json 3
