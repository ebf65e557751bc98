#!/usr/bin/env bash
# Held-out multi-hop QA of the built-in model: base -> `wapo sft` -> `wapo train` (WAPO, then
# GRPO with the same number of steps), each evaluated by benchmarks/multihop_eval.py on the
# same held-out questions (a world whose entities neither SFT nor RL ever sees).
#
#   bash benchmarks/multihop_measure.sh                  # into runs/multihop-measure
#   python benchmarks/multihop_table.py runs/multihop-measure
#
# The WAPO run trains for RL_MINUTES of wall time (Ctrl-C semantics: it stops after a whole
# step, checkpointed); GRPO then runs the same number of steps (RL_STEPS overrides both).
# Stages whose output exists are skipped, so the script can be rerun after an interruption.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/multihop-measure}
WORLD=${WORLD:-"top_k=2 max_observation_words=80"}
RL_MINUTES=${RL_MINUTES:-30}
SFT_STEPS=${SFT_STEPS:-40}  # 8 demonstrations a step, each seen once
N_EVAL=${N_EVAL:-100}
PY=${PY:-python}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$OUT"

evaluate() {  # name, model, [checkpoint]
    [ -f "$OUT/eval_$1.json" ] && return
    $PY benchmarks/multihop_eval.py --model "$2" ${3:+--checkpoint "$3"} --env-options $WORLD --n "$N_EVAL" \
        --max-new-tokens 64 --max-observation-tokens 200 --per-question --out "$OUT/eval_$1.json"
}

evaluate base builtin:smollm2-135m

[ -d "$OUT/sft/model" ] || $PY -m wapo.cli sft --env multihop --env-options $WORLD --n-demos $((8 * SFT_STEPS)) --steps "$SFT_STEPS" \
    --batch-size 8 --micro-batch-size 8 --lr 2e-4 --warmup-steps 2 --schedule cosine --bf16 true \
    --max-observation-tokens 200 --checkpoint-every 5 --output-dir "$OUT/sft"
evaluate sft "$OUT/sft/model"

rl() {  # loss, steps, [time limit]
    [ -f "$OUT/$1/done" ] && return
    ${3:+timeout -s INT "$3"} $PY -m wapo.cli train --model "$OUT/sft/model" --env multihop --env-options $WORLD \
        --loss "$1" --steps "$2" --prompts-per-step 4 --samples-per-prompt 8 --max-new-tokens 64 \
        --max-observation-tokens 200 --lr 3e-5 --bf16 true --diagnose-skipped-rows false --eval-size 0 \
        --checkpoint-every 1 --keep-checkpoints 1 --output-dir "$OUT/$1"
    touch "$OUT/$1/done"
}

if [ -n "${RL_STEPS:-}" ]; then rl wapo "$RL_STEPS"; else rl wapo 1000 "${RL_MINUTES}m"; fi
STEPS=$(ls "$OUT/wapo/checkpoints" | sed 's/step_0*//' | sort -n | tail -1)
echo "WAPO trained $STEPS steps; GRPO gets the same"
evaluate wapo "$OUT/sft/model" "$OUT/wapo"
rl grpo "$STEPS"
evaluate grpo "$OUT/sft/model" "$OUT/grpo"
