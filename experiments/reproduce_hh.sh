#!/usr/bin/env bash
# The small-scale reproduction of the ASFT paper's HH-RLHF study (docs/reproduction/README.md).
#
#   bash experiments/reproduce_hh.sh          train the five recipes (resuming any interrupted run),
#                                             score and generate on held-out pairs, write the results,
#                                             answer MT-Bench
#   bash experiments/reproduce_hh.sh --check  retrain ASFT's first 3 steps in a temporary directory
#                                             and compare its losses with the committed metrics.jsonl
#
# Everything a step writes is skipped on a rerun once its output exists. ASFT_DATA overrides the
# shared data folder (default ../shared/data); OBJECTIVES="asft dpo" limits the study.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${ASFT_DATA:-../shared/data}
HELDOUT="$DATA/hh-rlhf/helpful-base/test.jsonl.gz#part=heldout,holdout=0.15,seed=0"
TRAIN="$DATA/hh-rlhf/helpful-base/test.jsonl.gz#part=train,holdout=0.15,seed=0,limit=256"
HARMLESS="$DATA/hh-rlhf/harmless-base/test.jsonl.gz"
MT_BENCH="$DATA/mt_bench/question.jsonl"
read -ra OBJECTIVES <<< "${OBJECTIVES:-asft dpo sft orpo simpo}"
RUNS=runs/repro
DOCS=docs/reproduction
STUDY=(python experiments/reproduce_hh.py)
DATA_ARGS=(data.path="$TRAIN" data.eval_path="$HELDOUT")

if [[ "${1:-}" == "--check" ]]; then
  exec "${STUDY[@]}" check configs/repro/smollm2_hh_asft.yaml "$DOCS/smollm2_hh_asft/metrics.jsonl" "${DATA_ARGS[@]}"
fi

# 1. Training: each run resumes from its newest checkpoint if one exists.
for obj in "${OBJECTIVES[@]}"; do
  name=smollm2_hh_$obj
  if [[ ! -f "$RUNS/$name/done" ]]; then
    "${STUDY[@]}" timed "$RUNS/$name/resources.jsonl" -- asft train "configs/repro/$name.yaml" "${DATA_ARGS[@]}"
    touch "$RUNS/$name/done"
  fi
done

# 2. Held-out scores of the starting model and every trained one: the first 100 held-out helpful-base
#    pairs (scored, and greedy answers to their prompts scored with BLEU-4 / ROUGE-L against the chosen
#    responses) and the first 100 harmless-base pairs (scored).
score() {  # score MODEL OUT_DIR
  mkdir -p "$2"
  if [[ ! -f "$2/heldout_eval.json" ]]; then
    asft eval --model "$1" --data "$HELDOUT" --limit 100 --batch-size 32 --generate --max-new-tokens 64 \
      --output "$2/heldout_eval.jsonl" | tail -n 1 > "$2/heldout_eval.json.partial"
    mv "$2/heldout_eval.json.partial" "$2/heldout_eval.json"
  fi
  if [[ ! -f "$2/harmless_eval.json" ]]; then
    asft eval --model "$1" --data "$HARMLESS" --limit 100 --batch-size 16 \
      --output "$2/harmless_eval.jsonl" | tail -n 1 > "$2/harmless_eval.json.partial"
    mv "$2/harmless_eval.json.partial" "$2/harmless_eval.json"
  fi
}
score demo:smollm2 "$DOCS/smollm2_base"
for obj in "${OBJECTIVES[@]}"; do
  name=smollm2_hh_$obj
  score "$RUNS/$name" "$DOCS/$name"
  cp "$RUNS/$name/metrics.jsonl" "$RUNS/$name/resources.jsonl" "$DOCS/$name/"
done

# 3. Results: the curves of every run overlaid, results.json, and claim (a)'s plot.
asft report "${OBJECTIVES[@]/#/$RUNS/smollm2_hh_}" --output "$DOCS/report"
"${STUDY[@]}" summarize "$DOCS" "${OBJECTIVES[@]}"

# 4. MT-Bench: every trained model answers the 80 questions, both turns, in FastChat's answer format
#    (for judging elsewhere: FastChat's gen_judgment.py).
for obj in "${OBJECTIVES[@]}"; do
  out="$DOCS/smollm2_hh_$obj/mt_bench_answers.jsonl"
  if [[ ! -f "$out" ]]; then
    asft generate --model "$RUNS/smollm2_hh_$obj" --prompts "$MT_BENCH" --model-id "smollm2_hh_$obj" \
      --max-new-tokens 128 --batch-size 40 --output "$out.partial"
    mv "$out.partial" "$out"
  fi
done
