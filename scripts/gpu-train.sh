#!/usr/bin/env bash
# Joint W8/W4/W2 training of SmolLM2-135M on a GPU within a wall-clock budget, then WikiText-2
# perplexity of the result (llama.cpp protocol, ctx 512, full file) at fp, 8, 4 and 2 bits on the
# same GPU. The recipe is the ablation's weights+KD run (scripts/alrs-ablation.sh, g128-none-all-2e-5)
# with a larger batch; the number of steps is chosen from the step time measured by a 3-step probe,
# so that training takes about BUDGET seconds.
#
# Needs binaries built with CUDA: cargo build --release --features quantize/cuda,evals/cuda
#   (nvcc on the PATH, CUDA_COMPUTE_CAP=90 for an H100/H200).
# Env: BIN (target/release), MODEL (default), DATA (../shared/data/austen), WIKI
#   (../shared/data/wikitext-2-raw/wiki.test.raw), OUT (target/gpu-train), BUDGET (300 s),
#   BATCH (16 on a GPU with 120 GB or more, else 8), SEQ (512), ALRS (none), TRAIN (all), LR (2e-5),
#   WINDOWS (0 = the full file).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
MODEL=${MODEL:-default}
DATA=${DATA:-../shared/data/austen}
WIKI=${WIKI:-../shared/data/wikitext-2-raw/wiki.test.raw}
OUT=${OUT:-target/gpu-train}
BUDGET=${BUDGET:-300}
if [ -z "${BATCH:-}" ]; then
    # Batch 16 x 512 took 94.5 GB on an H200 (docs/BENCHMARKS.md): an 80 GB H100 takes 8.
    MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 || true)
    if [ "${MEM_MIB:-0}" -ge 120000 ]; then BATCH=16; else BATCH=8; fi
fi
SEQ=${SEQ:-512}
ALRS=${ALRS:-none}
TRAIN=${TRAIN:-all}
LR=${LR:-2e-5}
WINDOWS=${WINDOWS:-0}
mkdir -p "$OUT"
RUN=g128-$ALRS-$TRAIN-gpu

recipe() {
    echo --model "$MODEL" --config configs/train/w842-eta.toml --data "$DATA" --device cuda \
        --granularity group:128 --alrs "$ALRS" --train "$TRAIN" --lr "$LR" --kd-weight 1 --kd-temperature 1 \
        --batch "$BATCH" --seq-len "$SEQ" --scale-lr 2e-5 --min-lr-ratio 0.1 --heldout-blocks 16 --seed 0
}

# Probe: three steps; the step time is the mean of steps 2 and 3 (step 1 warms cuBLAS up).
# shellcheck disable=SC2046
"$BIN/drq-train" $(recipe) --steps 3 --warmup-steps 1 --eval-every 0 --save-every 0 \
    --run-dir "$OUT/probe" --out "$OUT/probe.safetensors" --force 2>&1 | grep -v "^\s*$" | tail -5
STEP_S=$(python3 -c "
import json
r=[json.loads(l) for l in open('$OUT/probe/log.jsonl') if '\"kind\":\"step\"' in l]
print((r[-1]['elapsed_s']-r[0]['elapsed_s'])/(len(r)-1))")
STEPS=$(python3 -c "print(max(10, int($BUDGET / ($STEP_S * 1.08))))")  # ~8% for the held-out evaluations
echo "== probe: ${STEP_S}s per step of $((BATCH * SEQ)) tokens -> $STEPS steps"

# shellcheck disable=SC2046
/usr/bin/time -v "$BIN/drq-train" $(recipe) --steps "$STEPS" --warmup-steps $((STEPS / 20 + 1)) \
    --eval-every $((STEPS / 8 + 1)) --save-every 0 --run-dir "$OUT/$RUN" --out "$OUT/$RUN.safetensors" --force \
    2> >(tee "$OUT/$RUN.log" | grep -E "held-out|wrote|error|Maximum resident|Elapsed" >&2)

LIMIT=()
[ "$WINDOWS" -gt 0 ] && LIMIT=(--max-windows "$WINDOWS")
"$BIN/drq-eval" perplexity -m "$OUT/$RUN.safetensors" --reference "$MODEL" -f "$WIKI" -p fp,8,4,2 \
    --runtime reference --device cuda "${LIMIT[@]}" --json "$OUT/wikitext2.json" | tee "$OUT/wikitext2.txt"
