#!/usr/bin/env bash
# HASB's Pareto front of docs/RESULTS.md: Hessian traces of the float model on calibration text
# (never WikiText-2), then on a checkpoint of that model, for each budget, the HASB profile, the
# trace-free allocation (same solver, equal sensitivities) and $RANDOM_SEEDS random allocations;
# then WikiText-2 perplexity (llama.cpp protocol, ctx 512, the first $WINDOWS windows; 0 = the
# full file) of the uniform bit-widths and every profile, plotted against bits per weight with
# llama.cpp's files of the model as reference points.
#
# Usage: scripts/hasb-pareto.sh CHECKPOINT
# Env: OUT (default target/hasb-pareto), MODEL (the checkpoint's float model; default: its
# recorded source), CALIBRATION (default: four Austen novels; Sense and Sensibility stays
# held out), BUDGETS (2.5,3,3.5,4,5), RANDOM_SEEDS (5), WINDOWS (20), PROBES (80), TRACES (reuse
# a traces file instead of estimating one).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:?usage: scripts/hasb-pareto.sh CHECKPOINT}
OUT=${OUT:-target/hasb-pareto}
A=../shared/data/austen
CALIBRATION=${CALIBRATION:-$A/emma.txt,$A/mansfieldpark.txt,$A/northangerabbey.txt,$A/prideprejudice.txt}
BUDGETS=${BUDGETS:-2.5,3,3.5,4,5}
RANDOM_SEEDS=${RANDOM_SEEDS:-5}
WINDOWS=${WINDOWS:-20}
PROBES=${PROBES:-80}
TEXT=../shared/data/wikitext-2-raw/wiki.test.raw
mkdir -p "$OUT/profiles"
cargo build --release --bin drq-hasb --bin drq-eval
BIN=target/release
# The float model: --model's, or the source the checkpoint records (safetensors header metadata).
SOURCE=${MODEL:-$(python3 -c 'import json,struct,sys
f=open(sys.argv[1],"rb"); n=struct.unpack("<Q",f.read(8))[0]
print(json.loads(json.loads(f.read(n))["__metadata__"]["provenance"])["source"])' "$CKPT")}

TRACES=${TRACES:-$OUT/traces.json}
if [ ! -f "$TRACES" ]; then
  "$BIN/drq-hasb" traces --model "$SOURCE" --calibration "$CALIBRATION" --max-probes "$PROBES" \
    --out "$TRACES" --plot "$OUT/traces.svg"
fi

PROFILED=$OUT/$(basename "$CKPT" .safetensors)-hasb.safetensors
"$BIN/drq-hasb" allocate "$CKPT" --model "$SOURCE" --traces "$TRACES" --budgets "$BUDGETS" --trace-free \
  --random "$RANDOM_SEEDS" --profiles-dir "$OUT/profiles" --out "$PROFILED" --replace | tee "$OUT/allocations.txt"

PRECISIONS=fp,8,6,5,4,3,2
for b in ${BUDGETS//,/ }; do
  name=$(python3 -c 'import sys; b=float(sys.argv[1]); print(f"{b:.1f}" if b == int(b) else sys.argv[1])' "$b")
  PRECISIONS+=,hasb-$name,tracefree-$name
  for ((s = 0; s < RANDOM_SEEDS; s++)); do PRECISIONS+=,random-$name-s$s; done
done
MAX_WINDOWS=()
if [ "$WINDOWS" != 0 ]; then MAX_WINDOWS=(--max-windows "$WINDOWS"); fi
"$BIN/drq-eval" perplexity -m "$PROFILED" --reference "$SOURCE" -p "$PRECISIONS" -f "$TEXT" "${MAX_WINDOWS[@]}" \
  --threads 2 --json "$OUT/pareto.json" --plot "$OUT/pareto.svg" \
  --reference-points docs/results/llamacpp-smollm2-wikitext2.json | tee "$OUT/pareto.txt"
