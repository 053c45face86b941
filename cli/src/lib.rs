//! What every drq binary shares, so the tools look and behave alike: logging, progress bars,
//! the error exit, `--device` and `--activations`, output checks, small-file writes and SVG plots.

pub mod plot;

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

/// Logs to stderr through `tracing`; `RUST_LOG` overrides the default `info` level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// The GPU a `--device` flag names: `None` for `cpu`, `Some(0)` for `cuda` (the first GPU),
/// `Some(N)` for `cuda:N`.
pub fn gpu_ordinal(name: &str) -> anyhow::Result<Option<usize>> {
    match name {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => anyhow::bail!("--device {name}: expected `cpu`, `cuda` or `cuda:N`"),
        },
    }
}

/// The candle device a `--device` flag names (see [`gpu_ordinal`]). A CUDA device needs a binary
/// built with the `cuda` feature and a GPU; without either this is an error.
pub fn parse_device(name: &str) -> anyhow::Result<candle_core::Device> {
    let Some(ordinal) = gpu_ordinal(name)? else {
        return Ok(candle_core::Device::Cpu);
    };
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!("--device {name}: this binary was built without CUDA (build with `--features cuda`)");
    }
    // candle appends a backtrace to CUDA errors: the first line says what went wrong.
    candle_core::Device::new_cuda(ordinal).map_err(|e| {
        anyhow::anyhow!("--device {name}: no usable GPU: {}", e.to_string().lines().next().unwrap_or_default())
    })
}

/// Refuses an output path `flag PATH` whose directory does not exist: checked when a tool starts,
/// not after its run.
pub fn check_output_dir(flag: &str, path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    anyhow::ensure!(dir.is_dir(), "{flag} {}: directory {} does not exist", path.display(), dir.display());
    Ok(())
}

/// Writes a small file (report, log, plot, text) through `PATH.tmp` and a rename: readers never
/// see a half-written file, and on error `path` is left as it was.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    model::checkpoint::write_through_tmp(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))
    })
}

/// A progress bar in the style of all drq tools (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({elapsed} elapsed, ETA {eta}) {prefix}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// The body of every drq binary's `main`: logging, then `run`; an error is printed with its
/// causes (`error: … : …`) and exits with status 1.
pub fn run_main(run: impl FnOnce() -> anyhow::Result<()>) {
    pin_candle_threads();
    keep_freed_memory();
    init_logging();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// candle looks its thread count up on every CPU matmul, and without `RAYON_NUM_THREADS` that
/// means parsing /proc/cpuinfo each time (measured: ~8% of a batched decode step, where
/// attention does two small matmuls per sequence and layer). Fix the count once, at start-up,
/// to the value candle would pick anyway. Runs before any other thread exists.
fn pin_candle_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// candle allocates and frees tensors of 100+ MB every step (logits, activations, gradients).
/// glibc serves those with fresh mmaps and unmaps them on free, so every step page-faults them
/// in again (measured: ~15% of a training step in the kernel, page faults and TLB shootdowns).
/// Serve every allocation from the heap and never give it back: drq-train ran 55 → 67 tok/s.
/// The cost is a resident set that stays at its peak.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The default `--threads` of the tools that run the kernels: every core this process may use
/// (the kernels' pool hands a mat-vec's shares over in well under a microsecond, so a single
/// sequence gains from a second core; docs/BENCHMARKS.md).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `--activations` of every tool that runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Activations {
    /// int8 activations: one scale per weight group at 4 bits and below (where the weights'
    /// rounding dominates: +0.9% perplexity at 4 bits for ~1.4x decode speed), one per 16 columns
    /// above on AVX-512 CPUs (+0.12% at 8 bits, faster than f32; f32 on the others).
    Auto,
    /// f32 activations: exactly the dequantized weights' products, up to summation order.
    F32,
    /// int8 activations (absmax per weight scale group), exact integer dot products: faster,
    /// and less accurate (docs/RESULTS.md).
    Int8,
    /// int8 activations with one absmax scale per 16 columns (SmolLM2's outlier channels stay
    /// resolved), exact integer dot products per 16 columns combined in f32.
    Int8Fine,
}

impl Activations {
    pub fn path(self) -> kernels::ActPath {
        match self {
            Activations::Auto => kernels::ActPath::Auto,
            Activations::F32 => kernels::ActPath::F32,
            Activations::Int8 => kernels::ActPath::Int8,
            Activations::Int8Fine => kernels::ActPath::Int8Fine,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activations::Auto => "auto",
            Activations::F32 => "f32",
            Activations::Int8 => "int8",
            Activations::Int8Fine => "int8-fine",
        }
    }
}
