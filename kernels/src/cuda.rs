//! The bit-plane kernels on an NVIDIA GPU, through `cudarc` (driver API only).
//!
//! The kernels are CUDA C (`kernels/cuda/*.cu`), compiled to PTX by `scripts/cuda-ptx.py` with a
//! pinned NVRTC and committed; the PTX is embedded in the binary and JIT-compiled by the driver
//! when a [`CudaRuntime`] starts. So building needs nothing of CUDA, and running needs only the
//! NVIDIA driver: `libcuda` is loaded at run time, and where it is missing (or there is no GPU)
//! [`CudaRuntime::new`] is an error, never a panic.
//!
//! A [`CudaPlanarWeight`] is a [`PlanarWeight`] uploaded once: its planes as 32-bit words (the
//! unit a warp loads, coalesced), its scales and the corrected scales of each corrected precision;
//! like the CPU layout it serves every precision 2..=8, precision `l` reading `l + 1` planes.
//! [`CudaRuntime::matmul`] computes `Y = X · Ŵ_lᵀ` on the GPU, equal to the CPU's
//! [`crate::ActPath::F32`] path up to f32 summation order (the kernel sums `q · x` over a 32-column
//! word and multiplies by `2^Δ · s` once per word where the word lies in one scale group).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

pub use cudarc::driver::CudaSlice;
use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaStream, LaunchConfig, PushKernelArg};

use crate::double_rounding::{check_bits, check_row_range, KernelError};
use crate::planar::{PlanarWeight, MAX_BATCH};

/// The PTX of `kernels/cuda/planar.cu` and `ops.cu` (generated; see the module docs).
const PLANAR_PTX: &str = include_str!("../cuda/planar.ptx");
const OPS_PTX: &str = include_str!("../cuda/ops.ptx");
/// Weight rows per thread block (one warp each): `WARPS` in `planar.cu`.
const WARPS: u32 = 8;
/// Activation rows one launch serves: `MAX_ROWS` in `planar.cu`. Larger batches take one launch
/// per chunk.
pub(crate) const LAUNCH_ROWS: usize = 8;
/// The driver library names tried, most specific first (Linux).
const DRIVER_LIBRARIES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
/// The oldest driver that loads the kernels' PTX (ISA 8.0, from CUDA 12.0's NVRTC:
/// `scripts/cuda-ptx.py`), as `cuDriverGetVersion` reports it: CUDA 12.0, drivers R525 and later.
/// Every driver call the runtime makes exists there (an older library would make cudarc panic).
pub const MIN_DRIVER_VERSION: i32 = 12000;

/// What can go wrong on the GPU path.
#[derive(Debug)]
pub enum CudaError {
    /// No NVIDIA driver library could be loaded.
    NoDriver,
    /// The driver is older than [`MIN_DRIVER_VERSION`] (its CUDA version, e.g. 11080).
    DriverTooOld { version: i32 },
    /// A CUDA driver call failed (no device at that ordinal, out of memory, a bad launch, …).
    Driver { what: &'static str, error: String },
    /// Shapes, lengths or precisions the kernels reject.
    Kernel(KernelError),
    /// A weight too large for the kernels' 32-bit word indices.
    TooLarge { rows: usize, cols: usize },
    /// A step row outside the key/value cache.
    OutOfCache { slot: usize, pos: usize, slots: usize, capacity: usize },
    /// Shapes that do not fit together.
    Shape(String),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::NoDriver => write!(
                f,
                "no NVIDIA driver: none of {} could be loaded (a GPU machine needs the driver; no CUDA toolkit is needed)",
                DRIVER_LIBRARIES.join(", ")
            ),
            CudaError::DriverTooOld { version } => write!(
                f,
                "the NVIDIA driver supports CUDA {}; the GPU kernels need CUDA {} or later (driver R525 or newer): update the driver",
                cuda_version(*version),
                cuda_version(MIN_DRIVER_VERSION)
            ),
            CudaError::Driver { what, error } => write!(f, "CUDA {what} failed: {error}"),
            CudaError::Kernel(e) => write!(f, "{e}"),
            CudaError::TooLarge { rows, cols } => {
                write!(f, "a {rows}x{cols} buffer is too large for the GPU kernels' 32-bit indices")
            }
            CudaError::OutOfCache { slot, pos, slots, capacity } => write!(
                f,
                "position {pos} of slot {slot} is outside the key/value cache ({slots} slots of {capacity} positions)"
            ),
            CudaError::Shape(what) => write!(f, "shapes do not fit: {what}"),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<KernelError> for CudaError {
    fn from(e: KernelError) -> Self {
        CudaError::Kernel(e)
    }
}

/// `12040` as `12.4`.
fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, v % 1000 / 10)
}

/// The CUDA version the loaded driver supports (`cuDriverGetVersion`).
fn driver_version() -> Result<i32, CudaError> {
    let mut version = 0;
    // SAFETY: the driver library loads (checked by the caller), cuDriverGetVersion needs no
    // initialisation, and it writes one int through a pointer valid for the call.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(driver("driver version query"))?;
    Ok(version)
}

fn driver(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver { what, error: e.to_string() }
}

/// Whether the NVIDIA driver library can be loaded. `cudarc` panics on first use where it cannot,
/// so this is checked before any driver call.
pub fn driver_available() -> bool {
    DRIVER_LIBRARIES.iter().any(|name| {
        // SAFETY: loading libcuda runs its initialisers, which have no preconditions on our side;
        // the handle is dropped at once (cudarc loads its own).
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// One GPU (a CUDA context and stream) with the kernels loaded.
pub struct CudaRuntime {
    stream: Arc<CudaStream>,
    /// `planar_matmul_f32_b{bits}` at index `bits − 2`.
    matmul: Vec<CudaFunction>,
    /// `planar_rows_f32_b{bits}` at index `bits − 2`.
    planar_rows: Vec<CudaFunction>,
    ops: OpsKernels,
    name: String,
}

/// The kernels of `ops.cu`.
struct OpsKernels {
    rms_norm: CudaFunction,
    add_assign: CudaFunction,
    add_bias: CudaFunction,
    silu_mul: CudaFunction,
    rope: CudaFunction,
    store_kv: CudaFunction,
    attend: CudaFunction,
    dense_matmul: CudaFunction,
    gather_rows: CudaFunction,
    argmax_rows: CudaFunction,
    sample_rows: CudaFunction,
}

impl fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaRuntime").field("device", &self.name).finish_non_exhaustive()
    }
}

impl CudaRuntime {
    /// Opens GPU `ordinal` and loads the kernels (the driver JIT-compiles the PTX).
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if !driver_available() {
            return Err(CudaError::NoDriver);
        }
        let version = driver_version()?;
        if version < MIN_DRIVER_VERSION {
            return Err(CudaError::DriverTooOld { version });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("context creation"))?;
        // SAFETY: every buffer of the runtime is used on its one stream only, so the order of
        // that stream is all the synchronization they need (and stream capture for CUDA graphs
        // must not wait on events recorded outside it).
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(driver("device query"))?;
        // Its own stream: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(driver("stream creation"))?;
        let planar = ctx.load_module(PLANAR_PTX.into()).map_err(driver("loading planar.ptx"))?;
        let ops = ctx.load_module(OPS_PTX.into()).map_err(driver("loading ops.ptx"))?;
        let by_bits = |prefix: &str| {
            (2..=8)
                .map(|bits| planar.load_function(&format!("{prefix}_b{bits}")))
                .collect::<Result<Vec<_>, _>>()
                .map_err(driver("loading a kernel"))
        };
        let op = |name: &str| ops.load_function(name).map_err(driver("loading a kernel"));
        Ok(CudaRuntime {
            stream,
            matmul: by_bits("planar_matmul_f32")?,
            planar_rows: by_bits("planar_rows_f32")?,
            ops: OpsKernels {
                rms_norm: op("rms_norm")?,
                add_assign: op("add_assign")?,
                add_bias: op("add_bias")?,
                silu_mul: op("silu_mul")?,
                rope: op("rope")?,
                store_kv: op("store_kv")?,
                attend: op("attend")?,
                dense_matmul: op("dense_matmul")?,
                gather_rows: op("gather_rows")?,
                argmax_rows: op("argmax_rows")?,
                sample_rows: op("sample_rows")?,
            },
            name,
        })
    }

    /// The GPU's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Uploads a weight (planes, scales, corrected scales).
    pub fn upload(&self, w: &PlanarWeight) -> Result<CudaPlanarWeight, CudaError> {
        let words = device_words(w)?;
        let layout = *w.layout();
        let mut corrected = BTreeMap::new();
        for bits in w.corrected_precisions() {
            corrected.insert(bits, self.upload_f32(w.scales_at(bits))?);
        }
        Ok(CudaPlanarWeight {
            rows: layout.rows,
            cols: layout.cols,
            group: layout.group.min(layout.cols.max(1)),
            n_groups: layout.n_groups(),
            wpr: words.wpr,
            plane_stride: words.plane_stride,
            has_d: w.has_d_plane(),
            planes: self.stream.clone_htod(&words.words).map_err(driver("upload"))?,
            scales: self.upload_f32(w.scales())?,
            corrected,
            bytes_per_plane: w.rows() * words.wpr * 4,
        })
    }

    /// Copies host values to a new device buffer.
    pub fn upload_f32(&self, values: &[f32]) -> Result<CudaSlice<f32>, CudaError> {
        self.stream.clone_htod(values).map_err(driver("upload"))
    }

    /// A zeroed device buffer of `len` values.
    pub fn zeros_f32(&self, len: usize) -> Result<CudaSlice<f32>, CudaError> {
        self.stream.alloc_zeros(len).map_err(driver("allocation"))
    }

    /// Copies a device buffer into `out` (same length) and waits for it.
    pub fn download(&self, values: &CudaSlice<f32>, out: &mut [f32]) -> Result<(), CudaError> {
        if out.len() != values.len() {
            return Err(KernelError::LengthMismatch { what: "out", expected: values.len(), got: out.len() }.into());
        }
        self.stream.memcpy_dtoh(values, out).map_err(driver("download"))?;
        self.synchronize()
    }

    /// Copies `src` into `dst` on the device (same length): the bandwidth baseline of the benches.
    pub fn copy(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<(), CudaError> {
        if src.len() != dst.len() {
            return Err(KernelError::LengthMismatch { what: "dst", expected: src.len(), got: dst.len() }.into());
        }
        self.stream.memcpy_dtod(src, dst).map_err(driver("device copy"))
    }

    /// Records what `queue` launches on the runtime's stream into a CUDA graph instead of running
    /// it (nothing may be allocated, copied from the host or waited for inside); replaying the
    /// graph ([`CudaGraph::launch`]) runs the same launches on the same buffers, with whatever
    /// they hold then, for one launch's overhead.
    pub fn capture(&self, queue: impl FnOnce() -> Result<(), CudaError>) -> Result<StepGraph, CudaError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver("graph capture"))?;
        let queued = queue();
        // The capture ends whatever `queue` did, so the stream is usable again.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0)).map_err(driver("graph capture"))?;
        queued?;
        graph.map(StepGraph).ok_or_else(|| CudaError::Shape("an empty graph was captured".to_string()))
    }

    /// Waits until everything queued on the runtime's stream has run.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver("synchronize"))
    }

    /// `Y = X · Ŵ_bitsᵀ` for `n ∈ 1..=64` activation rows on the device: `x` is `[n, cols]`, `y` is
    /// `[n, rows]`, both row-major (as [`PlanarWeight::matmul`]; longer buffers: their first rows). Queued on the runtime's stream;
    /// [`Self::download`] or [`Self::synchronize`] waits for it.
    pub fn matmul(
        &self,
        w: &CudaPlanarWeight,
        bits: u32,
        x: &CudaSlice<f32>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.matmul_rows(w, 0..w.rows, bits, x, n, y)
    }

    /// [`Self::matmul`] for the weight rows `rows` only: the other outputs of each activation row
    /// are left as they are, so a weight whose leading rows are served at another precision takes
    /// one call per row range (as [`crate::WeightParts`]' `rows` on the CPU).
    pub fn matmul_rows(
        &self,
        w: &CudaPlanarWeight,
        rows: Range<usize>,
        bits: u32,
        x: &CudaSlice<f32>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_bits(bits)?;
        check_row_range(&rows, w.rows)?;
        if !(1..=MAX_BATCH).contains(&n) {
            return Err(KernelError::InvalidBatch(n).into());
        }
        // Buffers may be longer (a step's preallocated rows): the first n rows are used.
        if x.len() < n * w.cols {
            return Err(KernelError::LengthMismatch { what: "x", expected: n * w.cols, got: x.len() }.into());
        }
        if y.len() < n * w.rows {
            return Err(KernelError::LengthMismatch { what: "y", expected: n * w.rows, got: y.len() }.into());
        }
        if rows.is_empty() {
            return Ok(());
        }
        let func = &self.matmul[bits as usize - 2];
        let scales = w.corrected.get(&bits).unwrap_or(&w.scales);
        let cfg = launch_config(rows.len());
        let [plane_stride, wpr, n_groups, group, row_begin, row_end, all_rows, cols] =
            [w.plane_stride, w.wpr, w.n_groups, w.group, rows.start, rows.end, w.rows, w.cols].map(|v| v as u32);
        let has_d = i32::from(w.has_d);
        for (start, len) in batch_chunks(n) {
            let x_chunk = x.slice(start * w.cols..(start + len) * w.cols);
            let mut y_chunk = y.slice_mut(start * w.rows..(start + len) * w.rows);
            let len = len as u32;
            let mut launch = self.stream.launch_builder(func);
            launch
                .arg(&w.planes)
                .arg(&plane_stride)
                .arg(&wpr)
                .arg(scales)
                .arg(&n_groups)
                .arg(&group)
                .arg(&row_begin)
                .arg(&row_end)
                .arg(&all_rows)
                .arg(&cols)
                .arg(&has_d)
                .arg(&x_chunk)
                .arg(&len)
                .arg(&mut y_chunk);
            // SAFETY: the arguments match `planar_matmul_f32_b{bits}`'s parameters in number, order
            // and type; the buffers hold what the launch reads and writes: `planes` every plane
            // the weight stores (`upload` checked the sizes fit the kernel's 32-bit indices),
            // `scales` `rows · n_groups` values, `x_chunk` `len · cols` and `y_chunk` `len · rows`
            // (lengths checked above), with `len ≤ LAUNCH_ROWS` as the kernel requires; the
            // launch covers `row_begin..row_end`, within the weight's rows (checked above).
            unsafe { launch.launch(cfg) }.map_err(driver("kernel launch"))?;
        }
        Ok(())
    }

    /// [`Self::matmul`] on host buffers: uploads `x`, runs, downloads into `y` (tests, checks).
    pub fn matmul_host(
        &self,
        w: &CudaPlanarWeight,
        bits: u32,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        if y.len() != n * w.rows {
            return Err(KernelError::LengthMismatch { what: "y", expected: n * w.rows, got: y.len() }.into());
        }
        let x_dev = self.upload_f32(x)?;
        let mut y_dev = self.zeros_f32(y.len())?;
        self.matmul(w, bits, &x_dev, n, &mut y_dev)?;
        self.download(&y_dev, y)
    }
}

/// A captured CUDA graph ([`CudaRuntime::capture`]), replayed on the runtime's stream.
pub struct StepGraph(CudaGraph);

// SAFETY: a graph is a pair of driver handles; the driver API may use them from any thread, and
// cudarc makes the graph's context current on that thread before each call. Replays of one graph
// are not concurrent: its owner replays it through `&self` from behind a lock (the step state of
// `model::transformer::cuda`).
unsafe impl Send for StepGraph {}

impl StepGraph {
    /// Replays the graph on the stream it was captured on.
    pub fn launch(&self) -> Result<(), CudaError> {
        self.0.launch().map_err(driver("graph launch"))
    }
}

/// A [`PlanarWeight`] resident on a GPU (see [`CudaRuntime::upload`]).
pub struct CudaPlanarWeight {
    rows: usize,
    cols: usize,
    /// Columns per scale group, at most `cols` (per channel: `cols`).
    group: usize,
    n_groups: usize,
    /// 32-bit words per row of a plane.
    wpr: usize,
    /// 32-bit words from one plane to the next.
    plane_stride: usize,
    has_d: bool,
    planes: CudaSlice<u32>,
    scales: CudaSlice<f32>,
    corrected: BTreeMap<u32, CudaSlice<f32>>,
    bytes_per_plane: usize,
}

impl CudaPlanarWeight {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of planes one matmul at `bits` reads (without the gaps between planes), as
    /// [`PlanarWeight::plane_bytes_read`].
    pub fn plane_bytes_read(&self, bits: u32) -> Result<usize, KernelError> {
        check_bits(bits)?;
        let planes = if bits == 8 { 8 + usize::from(self.has_d) } else { bits as usize + 1 };
        Ok(planes * self.bytes_per_plane)
    }
}

/// The planes of a weight as the GPU kernels index them.
#[derive(Debug)]
pub(crate) struct DeviceWords {
    /// Every plane, each `rows · wpr` words then the CPU layout's gap: 64-bit word `w` of the CPU
    /// layout becomes words `2w` (weights `64w ..`) and `2w + 1` (weights `64w + 32 ..`).
    pub words: Vec<u32>,
    /// 32-bit words per row.
    pub wpr: usize,
    /// 32-bit words from one plane to the next.
    pub plane_stride: usize,
}

/// Splits the CPU layout's 64-bit plane words into the 32-bit words the kernels load (explicitly,
/// low half first, so the result does not depend on the host's byte order).
pub(crate) fn device_words(w: &PlanarWeight) -> Result<DeviceWords, CudaError> {
    let words: Vec<u32> = w.plane_words().iter().flat_map(|&v| [v as u32, (v >> 32) as u32]).collect();
    if u32::try_from(words.len()).is_err() || u32::try_from(w.layout().n_scales()).is_err() {
        return Err(CudaError::TooLarge { rows: w.rows(), cols: w.cols() });
    }
    let planes = w.n_planes();
    Ok(DeviceWords { plane_stride: words.len() / planes, wpr: w.cols_padded() / 32, words })
}

/// The launch shape of a matmul over `rows` weight rows: one warp per row, [`WARPS`] per block.
pub(crate) fn launch_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows as u32).div_ceil(WARPS), 1, 1), block_dim: (WARPS * 32, 1, 1), shared_mem_bytes: 0 }
}

/// `(first row, rows)` of each launch of an `n`-row batch: chunks of [`LAUNCH_ROWS`].
pub(crate) fn batch_chunks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(LAUNCH_ROWS).map(move |start| (start, LAUNCH_ROWS.min(n - start)))
}

pub mod emulation;
mod ops;
pub use ops::{DeviceIds, KvArena, StepRows};

#[cfg(test)]
mod tests;
