//! Builds the emulated CUDA driver (`kernels::cuda::emulation`) into a directory, for running
//! the binaries' `--device cuda` on a machine without a GPU:
//!
//! ```text
//! cargo run -p kernels --example emulated-cuda-driver -- /tmp/emulated-cuda
//! LD_LIBRARY_PATH=/tmp/emulated-cuda drq-bench -m model.safetensors --device cuda
//! ```
//!
//! `scripts/gpu-check.sh --emulate` runs the GPU checks this way.

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: emulated-cuda-driver DIR");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| kernels::cuda::emulation::build_driver(&dir)) {
        eprintln!("error: {}: {e}", dir.display());
        std::process::exit(1);
    }
    println!("{}", dir.join("libcuda.so.1").display());
}
