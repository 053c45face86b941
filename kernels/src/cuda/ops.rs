//! Launches of `kernels/cuda/ops.cu` (the rest of a decode step) and of `planar.cu`'s row gather.
//! Every method checks the lengths of what the kernel will touch; the positions a step writes and
//! reads are checked once, when its [`StepRows`] are built.

use std::ops::Range;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{driver, CudaError, CudaPlanarWeight, CudaRuntime};
use crate::double_rounding::{check_bits, check_row_range, KernelError};
use crate::ops::AttentionShape;

/// Threads per block of the element-wise kernels: `OPS_BLOCK` in `ops.cu`.
const OPS_BLOCK: u32 = 256;
/// Activation rows one `dense_matmul` launch serves.
const DENSE_ROWS: usize = 8;

fn check_len(what: &'static str, len: usize, needed: usize) -> Result<(), CudaError> {
    if len < needed {
        return Err(KernelError::LengthMismatch { what, expected: needed, got: len }.into());
    }
    Ok(())
}

fn grid(x: u32, y: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (x, y, 1), block_dim: (OPS_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn elementwise(n: usize) -> LaunchConfig {
    grid((n as u32).div_ceil(OPS_BLOCK), 1)
}

/// The key/value cache of every layer on the device: `slots` sequences × `capacity` positions ×
/// `kv_dim` values per layer, position-major.
pub struct KvArena {
    /// Unique per arena of the process (what a captured graph was recorded on).
    id: u64,
    keys: Vec<CudaSlice<f32>>,
    values: Vec<CudaSlice<f32>>,
    slots: usize,
    capacity: usize,
    kv_dim: usize,
}

impl KvArena {
    /// An identifier no other arena of this process has.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Where each row of a step sits: its sequence's slot and its position, checked against an arena
/// when written ([`CudaRuntime::write_step_rows`]); device buffers of a fixed number of rows,
/// reused step after step.
pub struct StepRows {
    slot: CudaSlice<u32>,
    pos: CudaSlice<u32>,
    rows: usize,
    slots: usize,
    capacity: usize,
}

impl StepRows {
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
}

/// Row indices on the device (token ids, rows to gather), each checked below `bound` when written
/// ([`CudaRuntime::write_ids`]), in a buffer of a fixed number of ids reused step after step.
pub struct DeviceIds {
    ids: CudaSlice<u32>,
    len: usize,
    bound: usize,
}

impl DeviceIds {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CudaRuntime {
    /// A zeroed cache of `layers` layers for `slots` sequences of up to `capacity` positions.
    pub fn kv_arena(&self, layers: usize, slots: usize, capacity: usize, kv_dim: usize) -> Result<KvArena, CudaError> {
        let len = slots
            .checked_mul(capacity)
            .and_then(|v| v.checked_mul(kv_dim))
            .filter(|&v| u32::try_from(v).is_ok())
            .ok_or(CudaError::TooLarge { rows: slots * capacity, cols: kv_dim })?;
        let alloc = || (0..layers).map(|_| self.zeros_f32(len)).collect::<Result<Vec<_>, _>>();
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(KvArena { id, keys: alloc()?, values: alloc()?, slots, capacity, kv_dim })
    }

    /// Buffers for the rows of steps of up to `max_rows` rows (none written yet).
    pub fn step_rows(&self, max_rows: usize) -> Result<StepRows, CudaError> {
        Ok(StepRows { slot: self.zeros_u32(max_rows)?, pos: self.zeros_u32(max_rows)?, rows: 0, slots: 0, capacity: 0 })
    }

    /// Writes `(slot, position)` of each row of a step, checked against `arena` (and against the
    /// buffers' size).
    pub fn write_step_rows(
        &self,
        out: &mut StepRows,
        arena: &KvArena,
        rows: &[(usize, usize)],
    ) -> Result<(), CudaError> {
        check_len("step rows", out.slot.len(), rows.len())?;
        if let Some(&(slot, pos)) = rows.iter().find(|&&(s, p)| s >= arena.slots || p >= arena.capacity) {
            return Err(CudaError::OutOfCache { slot, pos, slots: arena.slots, capacity: arena.capacity });
        }
        let slot: Vec<u32> = rows.iter().map(|r| r.0 as u32).collect();
        let pos: Vec<u32> = rows.iter().map(|r| r.1 as u32).collect();
        if !rows.is_empty() {
            let (mut s, mut p) = (out.slot.slice_mut(..rows.len()), out.pos.slice_mut(..rows.len()));
            self.stream.memcpy_htod(&slot, &mut s).map_err(driver("upload"))?;
            self.stream.memcpy_htod(&pos, &mut p).map_err(driver("upload"))?;
        }
        (out.rows, out.slots, out.capacity) = (rows.len(), arena.slots, arena.capacity);
        Ok(())
    }

    /// A buffer for up to `max` ids (none written yet).
    pub fn device_ids(&self, max: usize) -> Result<DeviceIds, CudaError> {
        Ok(DeviceIds { ids: self.zeros_u32(max)?, len: 0, bound: 0 })
    }

    /// Writes `ids`, each checked below `bound` (and their number against the buffer's size).
    pub fn write_ids(&self, out: &mut DeviceIds, ids: &[u32], bound: usize) -> Result<(), CudaError> {
        check_len("ids", out.ids.len(), ids.len())?;
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= bound) {
            return Err(KernelError::RowOutOfRange { row: id as usize, rows: bound }.into());
        }
        if !ids.is_empty() {
            let mut dst = out.ids.slice_mut(..ids.len());
            self.stream.memcpy_htod(ids, &mut dst).map_err(driver("upload"))?;
        }
        (out.len, out.bound) = (ids.len(), bound);
        Ok(())
    }

    /// A zeroed device buffer of `len` `u32` values.
    pub fn zeros_u32(&self, len: usize) -> Result<CudaSlice<u32>, CudaError> {
        self.stream.alloc_zeros(len).map_err(driver("allocation"))
    }

    /// Copies the first `out.len()` values of a device buffer into `out` and waits for it.
    pub fn download_f32_prefix(&self, values: &CudaSlice<f32>, out: &mut [f32]) -> Result<(), CudaError> {
        check_len("values", values.len(), out.len())?;
        if !out.is_empty() {
            self.stream.memcpy_dtoh(&values.slice(..out.len()), out).map_err(driver("download"))?;
        }
        self.synchronize()
    }

    /// Copies the first `out.len()` values of a device buffer of `u32` into `out` and waits for it.
    pub fn download_u32_prefix(&self, values: &CudaSlice<u32>, out: &mut [u32]) -> Result<(), CudaError> {
        check_len("values", values.len(), out.len())?;
        if !out.is_empty() {
            self.stream.memcpy_dtoh(&values.slice(..out.len()), out).map_err(driver("download"))?;
        }
        self.synchronize()
    }

    /// RMSNorm of `rows` rows of `weight.len()` values: `out = x / sqrt(mean(x²) + eps) · weight`.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let h = weight.len();
        check_len("x", x.len(), rows * h)?;
        check_len("out", out.len(), rows * h)?;
        if rows == 0 {
            return Ok(());
        }
        let h32 = h as u32;
        let mut l = self.stream.launch_builder(&self.ops.rms_norm);
        l.arg(x).arg(weight).arg(&eps).arg(&h32).arg(out);
        // SAFETY: `rms_norm(x, w, eps, h, out)`; x and out hold rows · h values, w h (checked).
        unsafe { l.launch(grid(rows as u32, 1)) }.map_err(driver("rms_norm launch"))?;
        Ok(())
    }

    /// `x[i] += y[i]` for `i < n`.
    pub fn add_assign(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<(), CudaError> {
        check_len("x", x.len(), n)?;
        check_len("y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(&self.ops.add_assign);
        l.arg(x).arg(y).arg(&n32);
        // SAFETY: `add_assign(x, y, n)`; both hold at least n values (checked).
        unsafe { l.launch(elementwise(n)) }.map_err(driver("add_assign launch"))?;
        Ok(())
    }

    /// `x[r][c] += bias[c]` for `rows` rows of `bias.len()` values.
    pub fn add_bias(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize) -> Result<(), CudaError> {
        let n = rows * bias.len();
        check_len("x", x.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (n32, width) = (n as u32, bias.len() as u32);
        let mut l = self.stream.launch_builder(&self.ops.add_bias);
        l.arg(x).arg(bias).arg(&n32).arg(&width);
        // SAFETY: `add_bias(x, bias, n, width)`; x holds n = rows · width values (checked).
        unsafe { l.launch(elementwise(n)) }.map_err(driver("add_bias launch"))?;
        Ok(())
    }

    /// `gate[i] = silu(gate[i]) · up[i]` for `i < n`.
    pub fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>, n: usize) -> Result<(), CudaError> {
        check_len("gate", gate.len(), n)?;
        check_len("up", up.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(&self.ops.silu_mul);
        l.arg(gate).arg(up).arg(&n32);
        // SAFETY: `silu_mul(gate, up, n)`; both hold at least n values (checked).
        unsafe { l.launch(elementwise(n)) }.map_err(driver("silu_mul launch"))?;
        Ok(())
    }

    /// Rotate-half RoPE of each row's `heads` heads at the row's position, with tables of
    /// `[positions, head_dim / 2]` values covering the arena's capacity.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
        rows: &StepRows,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_len("x", x.len(), rows.rows * heads * head_dim)?;
        check_len("cos", cos.len(), rows.capacity * head_dim / 2)?;
        check_len("sin", sin.len(), rows.capacity * head_dim / 2)?;
        if rows.rows == 0 {
            return Ok(());
        }
        let (h32, d32) = (heads as u32, head_dim as u32);
        let mut l = self.stream.launch_builder(&self.ops.rope);
        l.arg(x).arg(&h32).arg(&d32).arg(&rows.pos).arg(cos).arg(sin);
        // SAFETY: `rope(x, heads, head_dim, pos, cos, sin)`; x holds rows · heads · head_dim values,
        // every position is below the capacity the tables cover (checked here and by step_rows).
        unsafe { l.launch(grid(rows.rows as u32, 1)) }.map_err(driver("rope launch"))?;
        Ok(())
    }

    /// Writes each row's keys and values (`[rows, kv_dim]`) into layer `layer` of the arena at the
    /// row's slot and position.
    pub fn store_kv(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rows: &StepRows,
        arena: &mut KvArena,
        layer: usize,
    ) -> Result<(), CudaError> {
        check_arena(rows, arena, layer)?;
        let kv_dim = arena.kv_dim;
        check_len("k", k.len(), rows.rows * kv_dim)?;
        check_len("v", v.len(), rows.rows * kv_dim)?;
        if rows.rows == 0 {
            return Ok(());
        }
        let (kv32, cap32) = (kv_dim as u32, arena.capacity as u32);
        let (keys, values) = (&mut arena.keys[layer], &mut arena.values[layer]);
        let mut l = self.stream.launch_builder(&self.ops.store_kv);
        l.arg(k).arg(v).arg(&kv32).arg(&rows.slot).arg(&rows.pos).arg(&cap32).arg(keys).arg(values);
        // SAFETY: `store_kv(k, v, kv_dim, slot, pos, capacity, kcache, vcache)`; k and v hold
        // rows · kv_dim values, and every (slot, pos) lies inside the arena (step_rows, checked).
        unsafe { l.launch(grid(rows.rows as u32, 1)) }.map_err(driver("store_kv launch"))?;
        Ok(())
    }

    /// Causal attention of each row over the first `pos + 1` positions of its slot in layer
    /// `layer`: `q` is `[rows, heads · head_dim]`, `out` the same; `scores` scratch of `rows · heads
    /// · capacity` values.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &CudaSlice<f32>,
        shape: AttentionShape,
        rows: &StepRows,
        arena: &KvArena,
        layer: usize,
        scores: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_arena(rows, arena, layer)?;
        if shape.kv_heads == 0 || !shape.heads.is_multiple_of(shape.kv_heads) || shape.kv_dim() != arena.kv_dim {
            return Err(CudaError::Shape(format!(
                "{} heads over {} key/value heads of {} for a cache of {} values per position",
                shape.heads, shape.kv_heads, shape.head_dim, arena.kv_dim
            )));
        }
        check_len("q", q.len(), rows.rows * shape.q_dim())?;
        check_len("out", out.len(), rows.rows * shape.q_dim())?;
        check_len("scores", scores.len(), rows.rows * shape.heads * arena.capacity)?;
        if rows.rows == 0 {
            return Ok(());
        }
        let [h32, kvh32, d32, cap32] = [shape.heads, shape.kv_heads, shape.head_dim, arena.capacity].map(|v| v as u32);
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let (keys, values) = (&arena.keys[layer], &arena.values[layer]);
        let mut l = self.stream.launch_builder(&self.ops.attend);
        l.arg(q)
            .arg(&h32)
            .arg(&kvh32)
            .arg(&d32)
            .arg(&rows.slot)
            .arg(&rows.pos)
            .arg(&cap32)
            .arg(keys)
            .arg(values)
            .arg(&scale)
            .arg(scores)
            .arg(out);
        // SAFETY: `attend(q, heads, kv_heads, head_dim, slot, pos, capacity, kcache, vcache,
        // scale, scores, out)`; q and out hold rows · heads · head_dim values, scores rows · heads
        // · capacity, every (slot, pos) lies inside the arena, whose layer holds slots · capacity
        // · kv_heads · head_dim values (checked).
        unsafe { l.launch(grid(rows.rows as u32, shape.heads as u32)) }.map_err(driver("attend launch"))?;
        Ok(())
    }

    /// `y = x · wᵀ` for a float weight `w` (`[rows, cols]`, row-major) and `n` activation rows.
    pub fn dense_matmul(
        &self,
        w: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        x: &CudaSlice<f32>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_len("w", w.len(), rows * cols)?;
        check_len("x", x.len(), n * cols)?;
        check_len("y", y.len(), n * rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (r32, c32) = (rows as u32, cols as u32);
        for (start, len) in (0..n).step_by(DENSE_ROWS).map(|s| (s, DENSE_ROWS.min(n - s))) {
            let x_chunk = x.slice(start * cols..(start + len) * cols);
            let mut y_chunk = y.slice_mut(start * rows..(start + len) * rows);
            let len32 = len as u32;
            let mut l = self.stream.launch_builder(&self.ops.dense_matmul);
            l.arg(w).arg(&r32).arg(&c32).arg(&x_chunk).arg(&len32).arg(&mut y_chunk);
            let cfg = LaunchConfig { grid_dim: (r32.div_ceil(8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: `dense_matmul(w, rows, cols, x, n, y)` with n ≤ 8; w holds rows · cols values,
            // the chunks len · cols and len · rows (checked).
            unsafe { l.launch(cfg) }.map_err(driver("dense_matmul launch"))?;
        }
        Ok(())
    }

    /// Rows `ids` of a float table of `cols` columns (and `table.len() / cols` rows).
    pub fn gather_rows(
        &self,
        table: &CudaSlice<f32>,
        cols: usize,
        ids: &DeviceIds,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let table_rows = table.len() / cols.max(1);
        if ids.bound > table_rows {
            return Err(KernelError::RowOutOfRange { row: ids.bound - 1, rows: table_rows }.into());
        }
        check_len("out", out.len(), ids.len * cols)?;
        if ids.len == 0 {
            return Ok(());
        }
        let c32 = cols as u32;
        let mut l = self.stream.launch_builder(&self.ops.gather_rows);
        l.arg(table).arg(&c32).arg(&ids.ids).arg(out);
        // SAFETY: `gather_rows(table, cols, ids, out)`; every id was checked below a bound of at
        // most the table's rows (write_ids, checked), out holds len · cols values.
        unsafe { l.launch(grid(ids.len as u32, 1)) }.map_err(driver("gather_rows launch"))?;
        Ok(())
    }

    /// Rows `ids` of a resident weight served at `bits`, dequantized (an embedding lookup), bit
    /// for bit [`crate::PlanarWeight::dequantize_rows`]. Only the ids within `rows` are written:
    /// a weight whose leading rows are served at another precision takes one call per row range.
    pub fn planar_rows(
        &self,
        w: &CudaPlanarWeight,
        rows: Range<usize>,
        bits: u32,
        ids: &DeviceIds,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_bits(bits)?;
        if ids.bound > w.rows {
            return Err(KernelError::RowOutOfRange { row: ids.bound - 1, rows: w.rows }.into());
        }
        check_row_range(&rows, w.rows)?;
        check_len("out", out.len(), ids.len * w.cols)?;
        if ids.len == 0 {
            return Ok(());
        }
        let scales = w.corrected.get(&bits).unwrap_or(&w.scales);
        let [stride, wpr, n_groups, group, row_begin, row_end, cols] =
            [w.plane_stride, w.wpr, w.n_groups, w.group, rows.start, rows.end, w.cols].map(|v| v as u32);
        let has_d = i32::from(w.has_d);
        let mut l = self.stream.launch_builder(&self.planar_rows[bits as usize - 2]);
        l.arg(&w.planes)
            .arg(&stride)
            .arg(&wpr)
            .arg(scales)
            .arg(&n_groups)
            .arg(&group)
            .arg(&row_begin)
            .arg(&row_end)
            .arg(&cols)
            .arg(&has_d)
            .arg(&ids.ids)
            .arg(out);
        let cfg = LaunchConfig { grid_dim: (ids.len as u32, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `planar_rows_f32_b{bits}(planes, plane_stride, wpr, scales, n_groups, group,
        // row_begin, row_end, cols, has_d, ids, out)`; every id was checked below a bound of at
        // most the weight's rows (write_ids, checked), out holds len · cols values.
        unsafe { l.launch(cfg) }.map_err(driver("planar_rows launch"))?;
        Ok(())
    }

    /// The index of each row's largest value (the first on ties) for `rows` rows of `vocab`.
    pub fn argmax_rows(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        check_len("logits", logits.len(), rows * vocab)?;
        check_len("out", out.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let v32 = vocab as u32;
        let mut l = self.stream.launch_builder(&self.ops.argmax_rows);
        l.arg(logits).arg(&v32).arg(out);
        // SAFETY: `argmax_rows(logits, vocab, out)`; logits hold rows · vocab values, out rows.
        unsafe { l.launch(grid(rows as u32, 1)) }.map_err(driver("argmax_rows launch"))?;
        Ok(())
    }

    /// Draws each row's next token from `softmax(logits · inv_t)` with its uniform `u ∈ [0, 1)`
    /// (weights `e^((l − max) · inv_t)`, the first token whose running sum reaches `u · total`,
    /// as `serve::sampling`'s plain sampler on the host), over `out`, which holds
    /// [`Self::argmax_rows`]'s picks: rows with `inv_t = 0` keep theirs (greedy). `rows` rows of
    /// `vocab`; `inv_t` and `u` hold at least `rows` values.
    pub fn sample_rows(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        inv_t: &CudaSlice<f32>,
        u: &CudaSlice<f64>,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        check_len("logits", logits.len(), rows * vocab)?;
        check_len("inv_t", inv_t.len(), rows)?;
        check_len("u", u.len(), rows)?;
        check_len("out", out.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let v32 = vocab as u32;
        let mut l = self.stream.launch_builder(&self.ops.sample_rows);
        l.arg(logits).arg(&v32).arg(inv_t).arg(u).arg(out);
        // SAFETY: `sample_rows(logits, vocab, inv_t, u, out)`; logits hold rows · vocab values,
        // inv_t, u and out at least rows each (checked above), one block per row.
        unsafe { l.launch(grid(rows as u32, 1)) }.map_err(driver("sample_rows launch"))?;
        Ok(())
    }

    /// Copies `values` into the start of a device buffer (queued on the stream).
    pub fn write_prefix<T: cudarc::driver::DeviceRepr>(
        &self,
        values: &[T],
        out: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        check_len("out", out.len(), values.len())?;
        if !values.is_empty() {
            self.stream.memcpy_htod(values, &mut out.slice_mut(..values.len())).map_err(driver("upload"))?;
        }
        Ok(())
    }

    /// A zeroed device buffer of `len` `f64` values.
    pub fn zeros_f64(&self, len: usize) -> Result<CudaSlice<f64>, CudaError> {
        self.stream.alloc_zeros(len).map_err(driver("allocation"))
    }
}

fn check_arena(rows: &StepRows, arena: &KvArena, layer: usize) -> Result<(), CudaError> {
    if layer >= arena.keys.len() || rows.slots != arena.slots || rows.capacity != arena.capacity {
        return Err(CudaError::Shape(format!(
            "layer {layer} of a cache of {} layers, {} slots × {} positions (rows built for {} × {})",
            arena.keys.len(),
            arena.slots,
            arena.capacity,
            rows.slots,
            rows.capacity
        )));
    }
    Ok(())
}
