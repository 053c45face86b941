//! The GPU path without a GPU: a CUDA driver library (`kernels/cuda/emulate/driver.cpp`) that
//! runs this crate's CUDA kernels on the CPU, built on demand with the host C++ compiler.
//!
//! Put the directory [`build_driver`] returns first on `LD_LIBRARY_PATH` of a process, and its
//! `--device cuda` (or [`super::CudaRuntime::new`]) opens the emulated GPU: the kernels' own
//! source runs one block at a time on fibers (`cuda_shim.h`), every driver call the host side
//! makes is checked as a GPU would (the PTX's kernel names and parameter sizes, launch limits,
//! pointers into live allocations, writes past an allocation, what stream capture allows). So the
//! whole host side (uploads, launch shapes, row ranges, the step's buffers and CUDA graphs,
//! batching) runs in the tests of any machine; only speed needs a real GPU.

use std::io;
use std::path::{Path, PathBuf};

/// The emulator's sources, laid out as in the repository (`emulate/` beside the `.cu` files).
const SOURCES: [(&str, &str); 4] = [
    ("emulate/cuda_shim.h", include_str!("../../cuda/emulate/cuda_shim.h")),
    ("emulate/driver.cpp", include_str!("../../cuda/emulate/driver.cpp")),
    ("ops.cu", include_str!("../../cuda/ops.cu")),
    ("planar.cu", include_str!("../../cuda/planar.cu")),
];

/// Writes the emulator's sources under `dir` and compiles the driver into `dir/libcuda.so.1`
/// (the name cudarc and [`super::driver_available`] load); returns `dir`. Needs a C++20
/// compiler (`$CXX`, else `c++`) on x86-64.
pub fn build_driver(dir: &Path) -> io::Result<PathBuf> {
    let src = dir.join("src");
    for (name, text) in SOURCES {
        let path = src.join(name);
        std::fs::create_dir_all(path.parent().expect("a relative source path"))?;
        std::fs::write(path, text)?;
    }
    compile(&src.join("emulate/driver.cpp"), &dir.join("libcuda.so.1"), true)?;
    Ok(dir.to_path_buf())
}

/// Compiles one emulator source into `out`: a shared library named `libcuda.so.1`, or a program.
pub(crate) fn compile(src: &Path, out: &Path, shared: bool) -> io::Result<()> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let mut command = std::process::Command::new(&cxx);
    command.args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas"]);
    if shared {
        command.args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1"]);
    }
    let output = command
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .map_err(|e| io::Error::other(format!("the CUDA emulation needs a C++20 compiler ({cxx}): {e}")))?;
    if !output.status.success() {
        return Err(io::Error::other(format!("{cxx} {}:\n{}", src.display(), String::from_utf8_lossy(&output.stderr))));
    }
    Ok(())
}
