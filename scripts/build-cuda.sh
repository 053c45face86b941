#!/usr/bin/env bash
# Builds drq-train, drq-reconstruct, drq-eval and drq-bench with CUDA (candle's CUDA backend) on a machine WITHOUT a CUDA
# toolkit or GPU, for a GPU machine that has the driver and the CUDA 13 libraries (cuBLAS, cuRAND,
# NVRTC, cudart): nvcc comes from NVIDIA's PyPI wheels, and the libraries the binaries link to are
# replaced at link time by stubs that carry only their names and symbols (the real ones are loaded
# at run time). Where a CUDA toolkit is installed, plain
#   CUDA_COMPUTE_CAP=90 cargo build --release --features quantize/cuda,evals/cuda --bin drq-train --bin drq-reconstruct --bin drq-eval
# does the same.
#
# Output: target/cuda/release/{drq-train,drq-reconstruct,drq-eval,drq-bench}. Run them with LD_LIBRARY_PATH holding the
# directories of libcuda.so.1, libcublas.so.13, libcublasLt.so.13, libcurand.so.10,
# libnvrtc.so.13 and libcudart.so.13. About 25 minutes on 2 cores (candle-kernels compiles
# llama.cpp's quantized matmul kernels with nvcc).
# Env: CUDA_COMPUTE_CAP (90: H100/H200), JOBS (cargo -j, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=${CUDA_COMPUTE_CAP:-90}
JOBS=${JOBS:-2}
TOOLKIT=$PWD/target/cuda-toolkit
export CARGO_TARGET_DIR=$PWD/target/cuda

if [ ! -x "$TOOLKIT/bin/nvcc" ]; then
    wheels=$(mktemp -d)
    for p in nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-cccl nvidia-cuda-runtime; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            -d "$wheels" "$p==13.0.*"
    done
    for w in "$wheels"/*.whl; do unzip -q -o "$w" -d "$wheels/x"; done
    mkdir -p "$TOOLKIT"
    cp -r "$wheels"/x/nvidia/cu13/. "$TOOLKIT"/
    rm -rf "$wheels"
fi
export PATH=$TOOLKIT/bin:$PATH CUDA_PATH=$TOOLKIT CUDA_COMPUTE_CAP=$CAP

# name of the -l library, its SONAME, and the symbols it must define (grep -E on undefined symbols)
LIBS=("cuda libcuda.so.1 ^cu[A-Z]" "nvrtc libnvrtc.so.13 ^nvrtc" "cublasLt libcublasLt.so.13 ^cublasLt"
    "cublas libcublas.so.13 ^cublas[^L]" "curand libcurand.so.10 ^curand")
stubs() { # $1: file of undefined symbol names (empty: no symbols)
    local src
    src=$(mktemp -d)
    for entry in "${LIBS[@]}"; do
        read -r name soname pattern <<<"$entry"
        { grep -E "$pattern" "$1" || true; } | sed 's/.*/void &(void) {}/' >"$src/$name.c"
        gcc -shared -fPIC -Wl,-soname,"$soname" -o "$TOOLKIT/lib/lib$name.so" "$src/$name.c"
    done
    ln -sf libcudart.so.13 "$TOOLKIT/lib/libcudart.so"
    rm -rf "$src"
}

# 1. Link once against symbol-less stubs, leaving the CUDA symbols unresolved, to learn them.
stubs /dev/null
cargo rustc --release -j "$JOBS" -p quantize --features cuda --bin drq-train -- -C link-arg=-Wl,--unresolved-symbols=ignore-all
cargo rustc --release -j "$JOBS" -p quantize --features cuda --bin drq-reconstruct -- -C link-arg=-Wl,--unresolved-symbols=ignore-all
cargo rustc --release -j "$JOBS" -p evals --features cuda --bin drq-eval -- -C link-arg=-Wl,--unresolved-symbols=ignore-all
cargo rustc --release -j "$JOBS" -p evals --features cuda --bin drq-bench -- -C link-arg=-Wl,--unresolved-symbols=ignore-all
undefined=$(mktemp)
nm -D --undefined-only "$CARGO_TARGET_DIR"/release/drq-{train,reconstruct,eval,bench} | awk '{print $2}' | sed 's/@.*//' | sort -u >"$undefined"
# 2. Stubs defining exactly those symbols, and the real link.
stubs "$undefined"
rm -f "$undefined"
cargo build --release -j "$JOBS" --features quantize/cuda,evals/cuda --bin drq-train --bin drq-reconstruct --bin drq-eval --bin drq-bench
readelf -d "$CARGO_TARGET_DIR/release/drq-train" | grep NEEDED
ls -la "$CARGO_TARGET_DIR"/release/drq-{train,reconstruct,eval,bench}
