#!/usr/bin/env bash
# End-to-end speed of SmolLM2-135M from one checkpoint, as recorded in docs/BENCHMARKS.md:
#   1. drq-bench: greedy decode tokens/s at 8, 4, 2 bits (32-token prompt, 128 generated),
#      batch 1, 4 and 16, f32 and int8 activations, with peak memory; then 5 sequences at each
#      of 8, 4 and 2 bits in the same steps (--mixed: one pass of the kernels for every
#      precision, as drq-serve runs, against one pass per precision);
#   2. drq-serve + drq-loadgen: N = 1, 4, 16 streaming clients mixing 8/4/2 for DURATION s each.
# Usage: scripts/bench-serving.sh [CHECKPOINT] (default: quantizes ../shared's GGUF per channel).
# Run it on a quiet machine; it takes about 10 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-30}
PORT=${PORT:-8188}
OUT=${OUT:-target/bench-serving}
mkdir -p "$OUT"
cargo build --release --bin drq-quantize --bin drq-bench --bin drq-serve --bin drq-loadgen
BIN=target/release
CKPT=${1:-$OUT/smollm2-channel.safetensors}
if [ ! -f "$CKPT" ]; then
    "$BIN/drq-quantize" --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --config configs/ptq/channel.toml \
        --profile configs/profiles/w4-embed8.toml --out "$CKPT"
fi

for act in f32 int8; do
    for batch in 1 4 16; do
        echo "== drq-bench --activations $act --batch $batch"
        "$BIN/drq-bench" --model "$CKPT" --precision 8,4,2 --batch "$batch" --activations "$act" \
            --json "$OUT/decode-$act-b$batch.json"
    done
done
echo "== drq-bench --mixed --batch 5"
"$BIN/drq-bench" --model "$CKPT" --precision 8,4,2 --mixed --batch 5 --json "$OUT/decode-mixed-b5.json"

"$BIN/drq-serve" --model "$CKPT" --port "$PORT" --max-batch 16 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
for clients in 1 4 16; do
    echo "== drq-loadgen --clients $clients"
    "$BIN/drq-loadgen" --url "http://127.0.0.1:$PORT" --clients "$clients" --duration "$DURATION" \
        --precisions 8,4,2 --max-tokens 64 --json "$OUT/load-c$clients.json"
done
kill -TERM $SERVER
wait $SERVER
