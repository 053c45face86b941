#!/usr/bin/env bash
# drq against llama.cpp on one machine, in one run, back to back and interleaved (docs/BENCHMARKS.md):
#   1. batch-1 decode (tg128) and prefill (pp128): llama-bench on Q8_0 / Q4_0 / Q2_K files made from
#      the shared GGUF, drq-bench at 8 / 4 / 2 bits of one drq checkpoint, at each thread count;
#   2. serving: llama-server (Q8_0, --parallel 16) and drq-serve (precisions 8/4/2 mixed) under the
#      same load generator (drq-loadgen) at 1, 4 and 16 streaming clients.
# Prints every figure and the ratios drq / llama.cpp, and writes them under $OUT.
#
# Usage: scripts/bench-vs-llamacpp.sh LLAMA_BIN_DIR [CHECKPOINT]
#   LLAMA_BIN_DIR holds llama-bench, llama-quantize and llama-server. Build them (CPU, Release)
#   from the vendor/llama.cpp of the llama-cpp-python source package (0.3.36 here):
#     cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
#       -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
#       -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF
#     cmake --build build -j2 --target llama-bench llama-quantize llama-server
#   (AMX off: these VMs advertise AMX but fault on tile instructions.)
#   CHECKPOINT defaults to the default recipe's checkpoint of the shared GGUF.
# Environment: THREADS (default "1 2"), ROUNDS (interleaved rounds, default 3), ACTIVATIONS (drq's
# activation paths to bench, default "auto f32": auto is the default, int8 at 4 and 2 bits), SERVE=0 to skip the serving part, DURATION
# (seconds per serving point, default 15), CLIENTS (default "1 4 16"), OUT (default
# target/bench-vs-llamacpp).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA=${1:?usage: scripts/bench-vs-llamacpp.sh LLAMA_BIN_DIR [CHECKPOINT]}
THREADS=${THREADS:-1 2}
ROUNDS=${ROUNDS:-3}
ACTIVATIONS=${ACTIVATIONS:-auto f32}
SERVE=${SERVE:-1}
DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-1 4 16}
OUT=${OUT:-target/bench-vs-llamacpp}
PORT=${PORT:-8191}
GGUF=../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf
for tool in llama-bench llama-quantize llama-server; do
    [ -x "$LLAMA/$tool" ] || { echo "error: $LLAMA/$tool not found (see the usage at the top of $0)" >&2; exit 2; }
done
[ -f "$GGUF" ] || { echo "error: $GGUF not found (the shared model)" >&2; exit 2; }
mkdir -p "$OUT"
cargo build --release --bin drq-quantize --bin drq-bench --bin drq-serve --bin drq-loadgen
BIN=target/release
CKPT=${2:-$OUT/smollm2-default.safetensors}
[ -f "$CKPT" ] || "$BIN/drq-quantize" --model "$GGUF" --bits 8,4,2 --out "$CKPT"
for q in Q8_0 Q4_0 Q2_K; do
    [ -f "$OUT/smollm2-$q.gguf" ] || "$LLAMA/llama-quantize" --allow-requantize "$GGUF" "$OUT/smollm2-$q.gguf" "$q" \
        >"$OUT/quantize-$q.log" 2>&1
done

echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, $(date -u +%F)"
# One line per measurement: tool threads precision test tokens_per_s.
RESULTS="$OUT/results.tsv"
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
    for t in $THREADS; do
        for pair in "Q8_0 8" "Q4_0 4" "Q2_K 2"; do
            set -- $pair
            "$LLAMA/llama-bench" -m "$OUT/smollm2-$1.gguf" -t "$t" -p 128 -n 128 -r 1 -o json 2>/dev/null |
                python3 -c '
import json, sys
for r in json.load(sys.stdin):
    test = "pp128" if r["n_prompt"] else "tg128"
    print("llama.cpp", sys.argv[1], sys.argv[2], test, r["avg_ts"], sep="\t")' "$t" "$1" >>"$RESULTS"
            for act in $ACTIVATIONS; do
                # As llama-bench: tg128 decodes 128 tokens from an empty context (here after a
                # 1-token prompt), pp128 prefills 128 tokens in one step.
                "$BIN/drq-bench" --model "$CKPT" --precision "$2" --threads "$t" --activations "$act" \
                    --prompt-tokens 1 --gen-tokens 129 --repeat 1 --json "$OUT/drq-tg.json" >/dev/null 2>&1
                "$BIN/drq-bench" --model "$CKPT" --precision "$2" --threads "$t" --activations "$act" \
                    --prompt-tokens 128 --gen-tokens 2 --repeat 1 --json "$OUT/drq-pp.json" >/dev/null 2>&1
                python3 -c '
import json, sys
tg = json.load(open(sys.argv[1] + "/drq-tg.json"))["rows"][0]
pp = json.load(open(sys.argv[1] + "/drq-pp.json"))["rows"][0]
print("drq-" + sys.argv[3], sys.argv[2], tg["precision"], "pp128", pp["prefill_tokens_per_s"], sep="\t")
print("drq-" + sys.argv[3], sys.argv[2], tg["precision"], "tg128", tg["decode_tokens_per_s"], sep="\t")' \
                    "$OUT" "$t" "$act" >>"$RESULTS"
            done
        done
    done
    echo "round $round of $ROUNDS done"
done
python3 - "$RESULTS" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    tool, t, p, test, v = line.split("\t")
    runs[(tool, t, p, test)].append(float(v))
med = {k: statistics.median(v) for k, v in runs.items()}
pairs = {"8": "Q8_0", "4": "Q4_0", "2": "Q2_K"}
tools = sorted({k[0] for k in med if k[0] != "llama.cpp"})
print(f"\nmedian of {len(next(iter(runs.values())))} interleaved rounds; ratio = drq / llama.cpp")
print(f"{'threads':>7} {'test':>6} {'pair':>9} {'llama.cpp':>10} " + " ".join(f"{t:>10} {'ratio':>6}" for t in tools))
for t in sorted({k[1] for k in med}):
    for test in ("tg128", "pp128"):
        for bits, q in pairs.items():
            base = med.get(("llama.cpp", t, q, test))
            if base is None:
                continue
            cells = []
            for tool in tools:
                v = med.get((tool, t, bits, test))
                cells.append(f"{v:>10.1f} {v / base:>5.2f}x" if v else f"{'-':>10} {'-':>6}")
            print(f"{t:>7} {test:>6} {'W' + bits + '/' + q:>9} {base:>10.1f} " + " ".join(cells))
EOF

[ "$SERVE" = 1 ] || exit 0
SERVE_THREADS=$(echo "$THREADS" | tr ' ' '\n' | sort -n | tail -1)
wait_up() { for _ in $(seq 150); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0; sleep 0.2; done; return 1; }
load() { # name precisions
    for c in $CLIENTS; do
        "$BIN/drq-loadgen" --url "http://127.0.0.1:$PORT" --clients "$c" --duration "$DURATION" --precisions "$2" \
            --max-tokens 64 --json "$OUT/load-$1-c$c.json" >"$OUT/load-$1-c$c.log" 2>&1 || true # errors are counted
    done
}
"$LLAMA/llama-server" -m "$OUT/smollm2-Q8_0.gguf" --port "$PORT" -t "$SERVE_THREADS" --parallel 16 -c 16384 \
    >"$OUT/llama-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
wait_up
load llama-server 8
kill $SERVER; wait $SERVER 2>/dev/null || true
"$BIN/drq-serve" --model "$CKPT" --port "$PORT" --max-batch 16 --threads "$SERVE_THREADS" >"$OUT/drq-serve.log" 2>&1 &
SERVER=$!
wait_up
load drq-serve 8,4,2
kill -TERM $SERVER; wait $SERVER 2>/dev/null || true
python3 - "$OUT" $CLIENTS <<'EOF'
import json, sys
out, clients = sys.argv[1], sys.argv[2:]
def agg(name, c):
    r = json.load(open(f"{out}/load-{name}-c{c}.json"))
    return r["all"]["tokens_per_second"], r["all"]["errors"]
print(f"\nserving, {' / '.join(clients)} clients, 64-token streaming requests (drq: precisions 8/4/2 mixed; llama-server: Q8_0)")
print(f"{'clients':>7} {'llama-server':>12} {'drq-serve':>10} {'errors':>7} {'ratio':>6} {'drq vs 1 client':>16}")
one = agg("drq-serve", clients[0])[0]
for c in clients:
    (l, le), (d, de) = agg("llama-server", c), agg("drq-serve", c)
    print(f"{c:>7} {l:>12.1f} {d:>10.1f} {le + de:>7} {d / l:>5.2f}x {d / one:>15.2f}x")
EOF
