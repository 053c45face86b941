#!/usr/bin/env bash
# The GPU serving kernels on an NVIDIA machine that has only the driver (no CUDA toolkit, no
# Rust), in well under 5 minutes: the kernels' tests (every precision and layout against the CPU
# kernels), then `drq-bench --kernels --device cuda` (every result checked against the CPU, µs
# per call and GB/s of plane bytes read per precision, a device-to-device copy as the bandwidth
# baseline) at batch 1, 16 and 64 on SmolLM2-135M's shapes and a 4096x4096 weight, and the CPU
# kernels of the same machine at batch 1 for scale; a summary table last.
#
#   scripts/gpu-check.sh --prepare   here (any machine with the workspace's Rust toolchain): builds
#                                    the binaries into .gpu/ (stripped, ~30 MB; git ignores .gpu/)
#   scripts/gpu-check.sh             there, from the repository root, with .gpu/ copied along (the
#                                    device tool: carry [".gpu"]); results under $OUT (.gpu/out)
#
# Decoding on the GPU (and greedy text equal to the CPU's) is not built yet: see issue 17.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    cargo build --release -p evals --bin drq-bench
    tests=$(cargo test --release -p kernels --lib --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kernels":
        print(m["executable"])')
    mkdir -p .gpu
    strip -o .gpu/drq-bench target/release/drq-bench
    strip -o .gpu/kernels-tests "$tests"
    ls -la .gpu
    exit 0
fi

[ -x .gpu/drq-bench ] && [ -x .gpu/kernels-tests ] || { echo "error: run scripts/gpu-check.sh --prepare first" >&2; exit 1; }
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt" || true
echo "== kernel tests (GPU against the CPU kernels)"
DRQ_EXPECT_GPU=1 .gpu/kernels-tests cuda:: --test-threads 1 2>&1 | tee "$OUT/tests.log"
for b in 1 16 64; do
    echo "== GPU kernels, batch $b"
    .gpu/drq-bench --kernels --device cuda -p 8,7,6,5,4,3,2 -b "$b" --json "$OUT/gpu-kernels-b$b.json" 2>&1 |
        tee "$OUT/gpu-kernels-b$b.txt"
done
echo "== CPU kernels of this machine, batch 1, $(nproc) threads"
.gpu/drq-bench --kernels --device cpu -p 8,4,2 -b 1 -t "$(nproc)" --json "$OUT/cpu-kernels-b1.json" 2>&1 |
    tee "$OUT/cpu-kernels-b1.txt"

echo "== summary: 4096x4096 (µs per call, GB/s; 8-bit time over each precision's)"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for b in (1, 16, 64):
    run = json.loads((out / f"gpu-kernels-b{b}.json").read_text())
    rows = {r["bits"]: r for r in run["rows"] if r["weight"].startswith("synthetic")}
    print(f"batch {b:>2} (copy {run['copy_gb_per_s']:.0f} GB/s): " + "  ".join(
        f"W{k} {r['us_per_call']:.1f} µs {r['gb_per_s']:.0f} GB/s {rows[8]['us_per_call'] / r['us_per_call']:.2f}x"
        for k, r in sorted(rows.items(), reverse=True)))
PY
