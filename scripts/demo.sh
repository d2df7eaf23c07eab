#!/usr/bin/env bash
# The main job on the embedded default (offline model + offline data), under 10 minutes on 2 CPU
# cores: train a weaver by SFT on step-by-step arithmetic -> evaluate memory off vs the weaver on
# 200 held-out problems (the same problems for both), then show the first 5 of them with the gold
# answer and each mode's answer, right or wrong (from the same run: no problem is picked).
set -euo pipefail
cd "$(dirname "$0")/.."
MEMGEN=.venv/bin/memgen
ART=runs/demo/sft-weaver
EVAL=runs/demo/eval
RECIPE=recipes/smollm2-135m/basic_arithmetic/demo/sft-weaver.yaml
step() { printf '\n== %s ==\n[%s]\n' "$1" "$(date '+%F %T')"; STEP_START=$SECONDS; }
took() { printf '(%s: %d s, until %s)\n' "$1" $((SECONDS - STEP_START)) "$(date +%T)"; }

step "1/2 memgen sft-weaver: SmolLM2-135M, offline reasoning_gym arithmetic, step-by-step targets"
rm -rf "$ART" "$ART.checkpoints" "$EVAL"   # a fresh run each time (a half-finished one is not resumed)
# 112 steps of 2 samples at lr 2e-3 (~5 min here): more small steps beat fewer large ones on the
# same samples (the recipe's header has the measurements).
$MEMGEN sft-weaver --recipe "$RECIPE" --output "$ART"
took "training"

step "2/2 memgen eval: memory off vs the weaver, the same 200 held-out problems; the first 5 shown"
# 200 problems: a paired difference of about 10 points is then some 3 standard errors.
$MEMGEN eval --artifact "$ART" --data gym:basic_arithmetic --memory off,weaver --limit 200 \
  --max-new-tokens 96 --batch-size 50 --show 5 --output "$EVAL"
took "evaluation"
printf '\ndemo: %d s in all; every answer is in %s/predictions.jsonl\n' "$SECONDS" "$EVAL"
