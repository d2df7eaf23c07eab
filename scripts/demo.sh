#!/usr/bin/env bash
# The main job on the embedded default (offline model + offline data), under 10 minutes on 2 CPU
# cores: train a weaver by SFT on step-by-step arithmetic -> evaluate memory off vs the weaver on
# 100 held-out problems (the same problems for both) -> answer one question without and with it.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMGEN=.venv/bin/memgen
ART=runs/demo/sft-weaver
RECIPE=recipes/smollm2-135m/basic_arithmetic/demo/sft-weaver.yaml
step() { printf '\n== %s ==\n' "$1"; STEP_START=$SECONDS; }
took() { printf '(%s: %d s)\n' "$1" $((SECONDS - STEP_START)); }

step "1/3 memgen sft-weaver: SmolLM2-135M, offline reasoning_gym arithmetic, step-by-step targets"
rm -rf "$ART" "$ART.checkpoints"   # a fresh run each time (a half-finished one is not resumed)
# 112 steps of 2 samples at lr 2e-3 (~5 min here): more small steps beat fewer large ones on the
# same samples (the recipe's header has the measurements).
$MEMGEN sft-weaver --recipe "$RECIPE" --output "$ART"
took "training"

step "2/3 memgen eval: memory off vs the weaver, the same 100 held-out problems"
$MEMGEN eval --artifact "$ART" --data gym:basic_arithmetic --memory off,weaver --limit 100 \
  --max-new-tokens 96 --batch-size 50 --output runs/demo/eval
took "evaluation"

step "3/3 memgen generate: one question, memory off, then with the weaver (⟨mem K⟩ = latents woven)"
QUESTION="Calculate 47 - 18 + 25."
$MEMGEN generate --artifact "$ART" --max-new-tokens 96 --memory off "$QUESTION"
$MEMGEN generate --artifact "$ART" --max-new-tokens 96 "$QUESTION"
took "two answers"
printf '\ndemo: %d s in all\n' "$SECONDS"
