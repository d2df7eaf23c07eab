#!/usr/bin/env bash
# The main job on the embedded default (offline model + offline data), a few minutes on 2 CPU cores:
# train a small weaver by SFT -> evaluate memory off vs weaver on held-out problems -> one answer.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMGEN=.venv/bin/memgen
ART=runs/demo/sft-weaver

echo "== 1/3 memgen sft-weaver (SmolLM2-135M, offline gsm_symbolic) =="
$MEMGEN sft-weaver --recipe recipes/smollm2-135m/gsm_symbolic/sft-weaver.yaml --output "$ART"

echo "== 2/3 memgen eval: memory off vs weaver, same held-out problems =="
$MEMGEN eval --artifact "$ART" --data gsm_symbolic --memory off,weaver --limit 32 \
  --max-new-tokens 192 --output runs/demo/eval

echo "== 3/3 memgen generate: one question, memory off, then the weaver's markers inline =="
QUESTION="A baker makes 24 muffins in the morning and 18 in the afternoon. He sells 30. How many muffins are left?"
$MEMGEN generate --artifact "$ART" --max-new-tokens 192 --memory off "$QUESTION"
$MEMGEN generate --artifact "$ART" --max-new-tokens 192 "$QUESTION"
