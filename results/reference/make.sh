#!/usr/bin/env bash
# Re-make results/reference from scratch: the ablation (baseline / +TWO / +MSG / MSG+TWO, 3 seeds)
# on digits-dvs and digits-dvs-hard, the mask-probability sweep p = 0..1 on digits-dvs-hard,
# the main job's setup (MSG+TWO) in fp32 and under bf16 autocast, then the figures and tables.
# Runs go to $1 (default: results), outside git; rerunning skips finished runs. About 35 minutes on a 2-core CPU.
set -euo pipefail
out="${1:-results}"
ref="$(cd "$(dirname "$0")" && pwd)"
msgsnn sweep --preset digits-dvs-hard --grid two.enabled=false,true --mask-p 0,0.5 --seeds 3 --name ablation-hard --out "$out" --jobs 2
msgsnn sweep --preset digits-dvs-hard --mask-p 0:1:0.25 --seeds 3 --name maskp-hard --out "$out" --jobs 2
msgsnn sweep --preset digits-dvs --grid two.enabled=false,true --mask-p 0,0.5 --seeds 3 --name ablation --out "$out" --jobs 2
msgsnn sweep --preset digits-dvs --grid train.amp=none,bf16 --seeds 3 --name amp --out "$out" --jobs 2

s="$out/sweeps/ablation"
msgsnn analyze table "$s" "$out/sweeps/ablation-hard" --out "$ref/ablation"
msgsnn analyze table "$out/sweeps/amp" --out "$ref/amp"
msgsnn analyze maskp "$out/sweeps/maskp-hard" --out "$ref/maskp-hard"
msgsnn analyze temporal "$s/mask_p=0.5_two=true_seed=42" --out "$ref/temporal"
msgsnn analyze curves "$s/mask_p=0_two=false_seed=42" "$s/mask_p=0_two=true_seed=42" \
    "$s/mask_p=0.5_two=false_seed=42" "$s/mask_p=0.5_two=true_seed=42" --out "$ref/curves"
msgsnn analyze grads "$s/mask_p=0.5_two=true_seed=42" --out "$ref/grads"
msgsnn analyze firing "$s/mask_p=0_two=false_seed=42" "$s/mask_p=0.5_two=false_seed=42" --out "$ref/firing"
for sweep in ablation ablation-hard maskp-hard amp; do
    cp "$out/sweeps/$sweep/sweep.csv" "$ref/sweep-$sweep.csv"
done
