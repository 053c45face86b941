#!/usr/bin/env bash
# The GPU serving path on an NVIDIA machine that has only the driver (no CUDA toolkit, no Rust),
# in a few minutes: the kernels' tests on the device (every precision and layout against the CPU
# kernels); `drq-bench --kernels --device cuda` (every result checked against the CPU, µs per
# call and GB/s of plane bytes read, a device-to-device copy as the bandwidth baseline) at batch
# 1, 16 and 64; then, on the shared SmolLM2 quantized there, greedy decoding on the GPU at 8, 4
# and 2 bits (tokens/s at batch 1, 16 and 64, and the first sequence's tokens against the CPU's);
# candle's own CUDA path on the same model in the same run (its Q8_0 QMatMul and f16 Llama, from
# a drq-bench built by scripts/build-cuda.sh, when --prepare finds one);
# the CPU of the same machine for scale; a summary last. Results under $OUT (default .gpu/out).
#
# The device tool carries at most 64 MiB per call, so the binaries and the model travel apart:
#   here:   scripts/gpu-check.sh --prepare      builds .gpu/bin (stripped binaries, ~30 MB) and
#                                                splits the shared GGUF into .gpu/model/part-*
#   there:  scripts/gpu-check.sh --receive      (one call per part, carry [".gpu/model/part-aa"],
#                                                then [".gpu/model/part-ab"]: parts stay on the
#                                                warm machine between calls)
#           scripts/gpu-check.sh                (carry [".gpu/bin"]): the checks
#   here, without a GPU: scripts/gpu-check.sh --emulate   (after --prepare) the same checks on this
#                                                machine's CPU through the emulated driver
#                                                (kernels::cuda::emulation), sizes cut so that they
#                                                run in minutes: the script, the binaries and their
#                                                --device cuda tried end to end before a lease
#           scripts/gpu-check.sh --reconstruct  (carry [".gpu/bin"], model parts received): instead of
#                                                the checks, the block-wise W4 recipe
#                                                (configs/blockwise/w4-best.toml) trained on the GPU by
#                                                a drq-reconstruct from scripts/build-cuda.sh, then its
#                                                perplexity at 8, 4, 3, 2 bits on 20 windows
# Without the model parts the decode checks are skipped with a message; the kernel checks run.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
# The sizes of the checks (--emulate cuts them).
GEN_TOKENS=${GEN_TOKENS:-128}
PROMPT_TOKENS=${PROMPT_TOKENS:-32}
REPEAT=${REPEAT:-3}
KERNEL_BATCHES=${KERNEL_BATCHES:-1 16 64}
DECODE_BATCHES=${DECODE_BATCHES:-1 16 64}
PPL_CTX=${PPL_CTX:-512}
PPL_WINDOWS=${PPL_WINDOWS:-20}
LOAD_CLIENTS=${LOAD_CLIENTS:-1 16 64}
LOAD_SECONDS=${LOAD_SECONDS:-15}
LOAD_TOKENS=${LOAD_TOKENS:-64}

case "${1:-run}" in
--prepare)
    cargo build --release -p evals --bin drq-bench --bin drq-eval -p quantize --bin drq-quantize \
        -p serve --bin drq-serve --bin drq-loadgen
    tests=$(cargo test --release -p kernels --lib --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kernels":
        print(m["executable"])')
    rm -rf .gpu/bin .gpu/model .gpu/stage
    mkdir -p .gpu/bin .gpu/model .gpu/stage
    for b in drq-bench drq-quantize drq-eval drq-serve drq-loadgen; do strip -o ".gpu/stage/$b" "target/release/$b"; done
    strip -o .gpu/stage/kernels-tests "$tests"
    # candle's CUDA path as the baseline (drq-bench --candle): a drq-bench built with candle's CUDA
    # backend by scripts/build-cuda.sh (25 minutes here; it needs CUDA 13's libraries there).
    if [ -x target/cuda/release/drq-bench ]; then
        strip -o .gpu/stage/drq-bench-candle target/cuda/release/drq-bench
    else
        echo "warning: no target/cuda/release/drq-bench (scripts/build-cuda.sh): the candle baseline will be skipped" >&2
    fi
    # The block-wise recipe on the GPU (--reconstruct): the same build's drq-reconstruct.
    if [ -x target/cuda/release/drq-reconstruct ]; then
        strip -o .gpu/stage/drq-reconstruct-cuda target/cuda/release/drq-reconstruct
        cp configs/blockwise/w4-best.toml .gpu/stage/
        cp -r ../shared/data/austen .gpu/stage/austen
    else
        echo "warning: no target/cuda/release/drq-reconstruct (scripts/build-cuda.sh): --reconstruct will not run" >&2
    fi
    cp ../shared/data/wikitext-2-raw/wiki.test.raw .gpu/stage/
    # Compressed: the binaries and the text together stay well under the transfer limit.
    tar -C .gpu/stage -cJf .gpu/bin/bin.tar.xz .
    rm -rf .gpu/stage
    split -b 48M "$GGUF" .gpu/model/part-
    (cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") | awk '{print $1"  model.gguf"}' >.gpu/bin/model.sha256
    du -sh .gpu/bin .gpu/model/*
    exit 0
    ;;
--receive)
    ls -la .gpu/model
    exit 0
    ;;
--emulate)
    driver=$(mktemp -d)
    cargo run -q -p kernels --example emulated-cuda-driver -- "$driver"
    export LD_LIBRARY_PATH="$driver:${LD_LIBRARY_PATH:-}"
    # An emulated SmolLM2 step takes ~12 s on one core: a few tokens, one batch, one short window.
    GEN_TOKENS=2 PROMPT_TOKENS=4 REPEAT=1 KERNEL_BATCHES=1 DECODE_BATCHES=1 PPL_CTX=16 PPL_WINDOWS=1
    LOAD_CLIENTS=2 LOAD_SECONDS=20 LOAD_TOKENS=2
    ;;
run | --reconstruct) ;;
*)
    echo "usage: scripts/gpu-check.sh [--prepare|--receive|--reconstruct|--emulate]" >&2
    exit 2
    ;;
esac

[ -f .gpu/bin/bin.tar.xz ] || {
    echo "error: run scripts/gpu-check.sh --prepare here, then carry .gpu/bin" >&2
    exit 1
}
python3 -c 'import tarfile; tarfile.open(".gpu/bin/bin.tar.xz").extractall(".gpu/bin")'
export PATH="$PWD/.gpu/bin:$PATH"
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
# candle's CUDA backend links CUDA 13's cuBLAS, cuRAND, NVRTC and runtime: their directories here.
cuda13_libdirs() {
    (ldconfig -p | awk '/lib(cublas|cublasLt|nvrtc|cudart)\.so\.13|libcurand\.so\.10/ {print $NF}'
        find /usr/local/cuda*/ /opt /usr/lib -name 'lib*.so.1[03]' \( -name 'libcublas*' -o -name 'libcurand*' \
            -o -name 'libnvrtc*' -o -name 'libcudart*' \) 2>/dev/null) | xargs -r -n1 dirname | sort -u | paste -sd:
}
# The shared GGUF from its received parts, checked against the checksum --prepare took.
assemble_model() {
    cat .gpu/model/part-* >/tmp/model.gguf
    (cd /tmp && sha256sum -c "$OLDPWD/.gpu/bin/model.sha256")
}
# Every check runs even when one before it failed: a lease is too short to rerun for the rest.
set +e
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt" || true

if [ "${1:-run}" = --reconstruct ]; then
    [ -x .gpu/bin/drq-reconstruct-cuda ] && ls .gpu/model/part-* >/dev/null 2>&1 || {
        echo "error: --reconstruct needs drq-reconstruct-cuda in .gpu/bin (scripts/build-cuda.sh, then --prepare) and the model parts (--receive)" >&2
        exit 1
    }
    assemble_model
    echo "== block-wise reconstruction on the GPU (configs/blockwise/w4-best.toml)"
    rm -rf /tmp/bw /tmp/bw.safetensors
    start=$(date +%s)
    LD_LIBRARY_PATH="$(cuda13_libdirs):${LD_LIBRARY_PATH:-}" drq-reconstruct-cuda --model /tmp/model.gguf \
        --config .gpu/bin/w4-best.toml --data .gpu/bin/austen --run-dir /tmp/bw --out /tmp/bw.safetensors \
        --device cuda 2>&1 | tee "$OUT/reconstruct.log"
    echo "reconstruction: $(($(date +%s) - start)) s" | tee -a "$OUT/reconstruct.log"
    mkdir -p "$OUT/run" && cp /tmp/bw/*.json /tmp/bw/recipe.toml "$OUT/run/"
    echo "== its perplexity on the GPU kernels, WikiText-2 first 20 windows (f32 activations)"
    drq-eval perplexity -m /tmp/bw.safetensors -p 8,4,3,2 -f .gpu/bin/wiki.test.raw --ctx 512 --max-windows 20 \
        --activations f32 --device cuda --json "$OUT/reconstruct-slice.json" 2>&1 | tail -6
    exit 0
fi

echo "== kernel tests on the GPU (against the CPU kernels)"
DRQ_EXPECT_GPU=1 kernels-tests cuda::tests::the_runtime_is_an_error_without_a_gpu_and_matches_the_cpu_with_one \
    2>&1 | tee "$OUT/tests.log"
for b in $KERNEL_BATCHES; do
    echo "== GPU kernels, batch $b"
    drq-bench --kernels --device cuda -p 8,7,6,5,4,3,2 -b "$b" --json "$OUT/gpu-kernels-b$b.json" 2>&1 |
        tee "$OUT/gpu-kernels-b$b.txt"
done

if ls .gpu/model/part-* >/dev/null 2>&1; then
    assemble_model
    # The default recipe, wide lm_head rows included (two launches of the head and the lookup).
    drq-quantize --model /tmp/model.gguf --out /tmp/default.safetensors 2>&1 | tail -2
    for b in $DECODE_BATCHES; do
        echo "== greedy decoding on the GPU, batch $b"
        drq-bench -m /tmp/default.safetensors --device cuda -p 8,4,2 -b "$b" --prompt-tokens "$PROMPT_TOKENS" \
            --gen-tokens "$GEN_TOKENS" -r "$REPEAT" --json "$OUT/gpu-decode-b$b.json" 2>&1 | tee "$OUT/gpu-decode-b$b.txt"
    done
    echo "== greedy decoding on the GPU, batch 1, without CUDA graphs (one launch per kernel)"
    DRQ_CUDA_GRAPHS=0 drq-bench -m /tmp/default.safetensors --device cuda -p 8,4,2 -b 1 --prompt-tokens "$PROMPT_TOKENS" \
        --gen-tokens "$GEN_TOKENS" -r "$REPEAT" --json "$OUT/gpu-decode-b1-nographs.json" 2>&1 |
        tee "$OUT/gpu-decode-b1-nographs.txt"
    echo "== perplexity through the GPU kernels against the CPU kernels (f32 activations), $PPL_WINDOWS windows"
    for dev in cuda cpu; do
        drq-eval perplexity -m /tmp/default.safetensors -p 8,4,2 -f .gpu/bin/wiki.test.raw --ctx "$PPL_CTX" \
            --max-windows "$PPL_WINDOWS" --activations f32 --device $dev --json "$OUT/ppl-$dev.json" 2>&1 | tail -5
    done
    echo "== drq-serve on the GPU under drq-loadgen (precisions 8/4/2 mixed, $LOAD_SECONDS s per point)"
    drq-serve --model /tmp/default.safetensors --device cuda --port 8181 --max-batch 64 >"$OUT/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do
        python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8181/health")' 2>/dev/null && break
        sleep 1
    done
    # Sampled (temperature 0.7: logits copied back, sampled on the host) at every client count,
    # then greedy (tokens picked on the GPU) at the largest: what the logits' copy costs.
    for c in $LOAD_CLIENTS; do
        drq-loadgen --url http://127.0.0.1:8181 --clients "$c" --duration "$LOAD_SECONDS" --precisions 8,4,2 \
            --max-tokens "$LOAD_TOKENS" --json "$OUT/serve-c$c.json" 2>&1 | tail -4
    done
    drq-loadgen --url http://127.0.0.1:8181 --clients "$c" --duration "$LOAD_SECONDS" --precisions 8,4,2 \
        --max-tokens "$LOAD_TOKENS" --temperature 0 --json "$OUT/serve-c$c-greedy.json" 2>&1 | tail -4
    kill "$server" && wait "$server" || true
    if [ -x .gpu/bin/drq-bench-candle ]; then
        libdirs=$(cuda13_libdirs)
        for b in $DECODE_BATCHES; do
            echo "== candle's CUDA path (its Q8_0 QMatMul, f16 Llama) against drq W8 on the GPU, same run, batch $b"
            LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}" drq-bench-candle -m /tmp/default.safetensors \
                --reference /tmp/model.gguf --device cuda -p 8 --candle q8_0,f16 -b "$b" --prompt-tokens "$PROMPT_TOKENS" \
                --gen-tokens "$GEN_TOKENS" -r "$REPEAT" --json "$OUT/candle-b$b.json" 2>&1 | tee "$OUT/candle-b$b.txt"
        done
    else
        echo "== no drq-bench-candle in .gpu/bin: candle baseline skipped (scripts/build-cuda.sh, then --prepare)"
    fi
    echo "== the same decoding on this machine's CPU, batch 1, $(nproc) threads"
    drq-bench -m /tmp/default.safetensors -p 8,4,2 -b 1 -t "$(nproc)" --prompt-tokens "$PROMPT_TOKENS" \
        --gen-tokens "$GEN_TOKENS" -r "$REPEAT" --json "$OUT/cpu-decode-b1.json" 2>&1 |
        tee "$OUT/cpu-decode-b1.txt"
else
    echo "== no model parts in .gpu/model: decode checks skipped (see --receive)"
fi

echo "== summary"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for b in (1, 16, 64):
    f = out / f"gpu-kernels-b{b}.json"
    if not f.exists():
        print(f"kernels batch {b}: no report (see gpu-kernels-b{b}.txt)")
        continue
    run = json.loads(f.read_text())
    rows = {r["bits"]: r for r in run["rows"] if r["weight"].startswith("synthetic")}
    print(f"kernels 4096x4096, batch {b:>2} (copy {run['copy_gb_per_s']:.0f} GB/s): " + "  ".join(
        f"W{k} {r['us_per_call']:.1f} µs {r['gb_per_s']:.0f} GB/s ({rows[8]['us_per_call'] / r['us_per_call']:.2f}x W8)"
        for k, r in sorted(rows.items(), reverse=True)))
for b in (1, 16, 64, "1-nographs"):
    f = out / f"gpu-decode-b{b}.json"
    if f.exists():
        rows = json.loads(f.read_text())["rows"]
        print(f"decode batch {b}: " + "  ".join(
            f"{r['precision']}: {r['decode_tokens_per_s']:.0f} tok/s (equal to CPU: {r['greedy_equal_to_cpu']})" for r in rows))
for b in (1, 16, 64):
    f = out / f"candle-b{b}.json"
    if f.exists():
        rows = {r["precision"]: r["decode_tokens_per_s"] for r in json.loads(f.read_text())["rows"]}
        q8 = rows.get("candle q8_0")
        print(f"batch {b:>2} decode, same run: drq W8 {rows.get('8', 0):.0f} tok/s, candle q8_0 {q8 or 0:.0f}, "
              f"candle f16 {rows.get('candle f16', 0):.0f}" + (f"  (drq W8 / candle q8_0: {rows['8'] / q8:.2f}x)" if q8 and "8" in rows else ""))
for f in sorted(out.glob("serve-c*.json"), key=lambda f: (len(f.name), f.name)):
    r = json.loads(f.read_text())["all"]
    print(f"serve {f.stem.removeprefix('serve-c')} clients: {r}")
if (out / "ppl-cuda.json").exists() and (out / "ppl-cpu.json").exists():
    gpu, cpu = (json.loads((out / f"ppl-{d}.json").read_text())["results"] for d in ("cuda", "cpu"))
    print("perplexity GPU / CPU: " + "  ".join(
        f"{g['label']}: {g['perplexity']:.4f} / {c['perplexity']:.4f}" for g, c in zip(gpu, cpu)))
PY
