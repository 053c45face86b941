#!/usr/bin/env bash
# The ALRS ablation of docs/RESULTS.md: joint W8/W4/W2 fine-tuning of SmolLM2-135M on
# ../shared/data/austen under one small budget, against PTQ, per ALRS policy, against three
# separately trained precisions, with and without distillation; then WikiText-2 perplexity of
# every checkpoint (llama.cpp protocol, ctx 512, the first $WINDOWS windows; 0 = the full file).
# Every run distils from the float model (KL only, T = 1) except `g128-eta-nokd`: fine-tuning on
# Austen's text alone moves the model towards Austen, and WikiText-2 W8 got worse (+3.6% over fp
# on 10 windows after 60 steps, KL to fp 0.002 → 0.09) while the held-out Austen perplexity fell.
#
# Usage: scripts/alrs-ablation.sh [RUN...]   (default: every run, in the order below)
# Env: OUT (default target/alrs-ablation), STEPS (40), BATCH (2), SEQ (256), WINDOWS (20),
# EVAL (1; 0 trains only, e.g. when several invocations train side by side), DATA (training text,
# default ../shared/data/austen; e.g. a file of drq-synth's sampled text).
# Runs already finished (their checkpoint exists) are skipped, so the script can be re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/alrs-ablation}
STEPS=${STEPS:-40}
BATCH=${BATCH:-2}
SEQ=${SEQ:-256}
WINDOWS=${WINDOWS:-20}
EVAL=${EVAL:-1}
MODEL=${MODEL:-default}
DATA=${DATA:-../shared/data/austen}
mkdir -p "$OUT"
cargo build --release --bin drq-train --bin drq-quantize --bin drq-eval
BIN=target/release

# The shared budget and optimizer of every run; each run below adds what it ablates.
COMMON=(--model "$MODEL" --config configs/train/w842-eta.toml --data "$DATA"
    --steps "$STEPS" --batch "$BATCH" --seq-len "$SEQ" --warmup-steps 5 --min-lr-ratio 0.1
    --scale-lr 2e-5 --eval-every 20 --heldout-blocks 8 --save-every 0 --seed 0)
# Each run: what it ablates (a flag may appear once, so the learning rate and KD are per run).
KD="--kd-weight 1 --kd-temperature 1"
BASE="--lr 5e-4 $KD"

declare -A RUNS=(
    [g128-eta]="--granularity group:128 --alrs eta $BASE"
    [g128-none]="--granularity group:128 --alrs none $BASE"
    [g128-relative]="--granularity group:128 --alrs relative $BASE"
    [g128-literal]="--granularity group:128 --alrs literal $BASE"
    [g128-only8]="--granularity group:128 --alrs none --bits 8 $BASE"
    [g128-only4]="--granularity group:128 --alrs none --bits 4 $BASE"
    [g128-only2]="--granularity group:128 --alrs none --bits 2 $BASE"
    [g128-eta-nokd]="--granularity group:128 --alrs eta --lr 5e-4 --kd-weight 0"
    [channel-eta]="--granularity channel --alrs eta $BASE"
    [g128-eta-all]="--granularity group:128 --alrs eta --train all --lr 1e-4 $KD"
    [g128-none-all]="--granularity group:128 --alrs none --train all --lr 1e-4 $KD"
    # Does the W2 step cost W8/W4 when weights train? g128-eta-all without 2 bits.
    [g128-eta-all-84]="--granularity group:128 --alrs eta --train all --lr 1e-4 --bits 8,4 $KD"
    # The GPU run's recipe (scripts/gpu-train.sh) at this machine's budget.
    [g128-none-all-2e-5]="--granularity group:128 --alrs none --train all --lr 2e-5 $KD"
    # What 4-bit QAT alone reaches at this machine's budget (the latent weights free to serve
    # 4 bits only): the reference the joint W4 is held to.
    [g128-only4-all]="--granularity group:128 --alrs none --bits 4 --train all --lr 5e-5 $KD"
    # Is W4's plateau the latent weights' step size? The same at 10x the learning rate.
    [g128-only4-all-5e-4]="--granularity group:128 --alrs none --bits 4 --train all --lr 5e-4 $KD"
)
ORDER=(g128-eta g128-none g128-relative g128-literal g128-only8 g128-only4 g128-only2 g128-eta-nokd channel-eta g128-eta-all g128-none-all g128-eta-all-84 g128-none-all-2e-5 g128-only4-all g128-only4-all-5e-4)
[ $# -gt 0 ] && ORDER=("$@")

for run in "${ORDER[@]}"; do
    [ -n "${RUNS[$run]+x}" ] || { echo "unknown run $run (known: ${!RUNS[*]})" >&2; exit 2; }
    if [ -f "$OUT/$run.safetensors" ]; then
        echo "== $run: done already"
        continue
    fi
    echo "== $run: drq-train ${RUNS[$run]}"
    # shellcheck disable=SC2086
    /usr/bin/time -v "$BIN/drq-train" "${COMMON[@]}" ${RUNS[$run]} --run-dir "$OUT/$run" --out "$OUT/$run.safetensors" \
        --force 2> >(tee "$OUT/$run.log" | grep -v "^\s*$" | grep -E "held-out|wrote|error|Maximum resident|Elapsed" >&2)
done

[ "$EVAL" = 1 ] || exit 0

# PTQ baselines with the same initial scales as the runs (the trainer's scale search).
for g in channel group:128; do
    name=ptq-${g/:/}
    [ -f "$OUT/$name.safetensors" ] || "$BIN/drq-quantize" --model "$MODEL" --granularity "$g" --out "$OUT/$name.safetensors"
done

LIMIT=()
[ "$WINDOWS" -gt 0 ] && LIMIT=(--max-windows "$WINDOWS")
CKPTS=()
for f in "$OUT"/ptq-*.safetensors; do CKPTS+=(-m "$f"); done
for run in "${ORDER[@]}"; do [ -f "$OUT/$run.safetensors" ] && CKPTS+=(-m "$OUT/$run.safetensors"); done
"$BIN/drq-eval" perplexity "${CKPTS[@]}" --reference "$MODEL" -f ../shared/data/wikitext-2-raw/wiki.test.raw \
    -p fp,8,4,2 "${LIMIT[@]}" --json "$OUT/wikitext2.json" | tee "$OUT/wikitext2.txt"
