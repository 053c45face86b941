//! `drq-bench --kernels`: the matmul kernels alone, on every distinct weight shape of a checkpoint
//! (plus a 4096×4096 weight, the shape of 7B-class models), per precision: µs per call and GB/s
//! of plane bytes read. On the CPU, or on a GPU, where every result is checked against the CPU
//! kernels and a device-to-device copy is timed in the same run as the bandwidth baseline.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use kernels::cuda::CudaRuntime;
use kernels::{Granularity, KernelConfig, PlanarWeight, QuantizedWeight, TieRule};
use model::ResidentModel;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

/// Rows and columns of the synthetic weight every run adds (a 7B-class projection).
pub const LARGE_SHAPE: (usize, usize) = (4096, 4096);

/// One weight, one precision.
#[derive(Debug, Serialize)]
pub struct KernelRow {
    pub weight: String,
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub batch: usize,
    pub us_per_call: f64,
    /// Plane bytes read per call over the time of a call.
    pub gb_per_s: f64,
    /// GPU only: `max |gpu − cpu| / max |cpu|` over the outputs.
    pub max_rel_err: Option<f64>,
}

/// The weights measured: the first of each distinct (rows, cols, scale group) of the checkpoint,
/// named by its role (layer prefix dropped), then [`LARGE_SHAPE`].
pub fn weights(resident: &ResidentModel) -> Result<Vec<(String, Arc<PlanarWeight>)>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (name, w) in resident.planar_weights() {
        if seen.insert((w.rows(), w.cols(), w.layout().group)) {
            let role = name.strip_prefix("model.layers.").and_then(|n| n.split_once('.')).map_or(name, |(_, r)| r);
            out.push((role.trim_end_matches(".weight").to_string(), Arc::clone(w)));
        }
    }
    out.push(large(resident.tie_rule())?);
    Ok(out)
}

/// Random weights of the given `(rows, cols)` shapes (scales per [`SYNTHETIC_GROUP`] columns,
/// HalfEven).
pub fn synthetic_weights(shapes: &[(usize, usize)]) -> Result<Vec<(String, Arc<PlanarWeight>)>> {
    shapes
        .iter()
        .map(|&(rows, cols)| {
            let name = if (rows, cols) == LARGE_SHAPE { "synthetic" } else { "random" };
            Ok((format!("{name} {rows}x{cols}"), Arc::new(synthetic(rows, cols, TieRule::HalfEven)?)))
        })
        .collect()
}

fn large(tie: TieRule) -> Result<(String, Arc<PlanarWeight>)> {
    let (rows, cols) = LARGE_SHAPE;
    Ok((format!("synthetic {rows}x{cols}"), Arc::new(synthetic(rows, cols, tie)?)))
}

/// `ROWSxCOLS[,ROWSxCOLS…]`.
pub fn parse_shapes(list: &str) -> Result<Vec<(usize, usize)>> {
    list.split(',')
        .map(|s| {
            let parsed = s.trim().split_once('x').and_then(|(r, c)| Some((r.parse().ok()?, c.parse().ok()?)));
            match parsed {
                Some((r, c)) if r > 0 && c > 0 => Ok((r, c)),
                _ => anyhow::bail!("shape {s:?}: expected ROWSxCOLS with both at least 1"),
            }
        })
        .collect()
}

/// Scale group of the synthetic weights (the default checkpoint's).
pub const SYNTHETIC_GROUP: usize = 128;

/// A weight of random codes (uniform int8) and scales per [`SYNTHETIC_GROUP`] columns, deterministic.
pub fn synthetic(rows: usize, cols: usize, tie: TieRule) -> Result<PlanarWeight> {
    let layout = Granularity::Group(SYNTHETIC_GROUP).layout(rows, cols)?;
    let mut rng = StdRng::seed_from_u64(7);
    let codes = (0..layout.n_weights()).map(|_| rng.random::<i8>()).collect();
    let scales = (0..layout.n_scales()).map(|_| 1e-3 * (1.0 + rng.random::<f32>())).collect();
    Ok(PlanarWeight::from_quantized(&QuantizedWeight::new(codes, scales, layout), tie)?)
}

/// Activations for a batch of `n` rows of `cols`, in [−1, 1), deterministic.
fn activations(n: usize, cols: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(11);
    (0..n * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Seconds per call of `run(k)` (which makes `k` calls and waits for them): doubling `k` from 1
/// until one measurement takes `min_seconds`, after one warm-up call.
fn seconds_per_call(min_seconds: f64, mut run: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    run(1)?;
    let mut k = 1;
    loop {
        let started = Instant::now();
        run(k)?;
        let elapsed = started.elapsed().as_secs_f64();
        if elapsed >= min_seconds || k >= 1 << 20 {
            return Ok(elapsed / k as f64);
        }
        k *= 2;
    }
}

fn row(weight: &str, w: &PlanarWeight, bits: u32, batch: usize, seconds: f64, err: Option<f64>) -> Result<KernelRow> {
    Ok(KernelRow {
        weight: weight.to_string(),
        rows: w.rows(),
        cols: w.cols(),
        bits,
        batch,
        us_per_call: seconds * 1e6,
        gb_per_s: w.plane_bytes_read(bits)? as f64 / seconds / 1e9,
        max_rel_err: err,
    })
}

/// Every weight at every precision on the CPU kernels of `cfg`.
pub fn run_cpu(
    weights: &[(String, Arc<PlanarWeight>)],
    precisions: &[u32],
    batch: usize,
    cfg: &KernelConfig,
    min_seconds: f64,
) -> Result<Vec<KernelRow>> {
    let mut rows = Vec::new();
    for (name, w) in weights {
        let x = activations(batch, w.cols());
        let mut y = vec![0f32; batch * w.rows()];
        for &bits in precisions {
            let s = seconds_per_call(min_seconds, |k| {
                for _ in 0..k {
                    w.matmul(bits, &x, batch, &mut y, cfg)?;
                }
                Ok(())
            })?;
            rows.push(row(name, w, bits, batch, s, None)?);
        }
    }
    Ok(rows)
}

/// What a GPU run measured.
#[derive(Debug, Serialize)]
pub struct GpuRun {
    pub device: String,
    /// Device-to-device copy of 256 MiB: bytes read plus bytes written per second.
    pub copy_gb_per_s: f64,
    pub rows: Vec<KernelRow>,
}

/// Largest `max |gpu − cpu| / max |cpu|` accepted (f32 sums in another order).
pub const MAX_REL_ERR: f64 = 1e-4;

/// Every weight at every precision on GPU `ordinal`, each result checked against the CPU kernels
/// of `cpu` (an error beyond [`MAX_REL_ERR`] fails the run), and the copy baseline.
pub fn run_cuda(
    weights: &[(String, Arc<PlanarWeight>)],
    precisions: &[u32],
    batch: usize,
    ordinal: usize,
    cpu: &KernelConfig,
    min_seconds: f64,
) -> Result<GpuRun> {
    let rt = CudaRuntime::new(ordinal)?;
    // The GPU kernels take f32 activations: the reference is the CPU's f32 path.
    let cpu = &KernelConfig { path: kernels::ActPath::F32, ..*cpu };
    tracing::info!("GPU {ordinal}: {}", rt.device_name());
    let copy_len = 64 << 20; // f32 values: 256 MiB
    let src = rt.upload_f32(&vec![1.0f32; copy_len])?;
    let mut dst = rt.zeros_f32(copy_len)?;
    let copy_s = seconds_per_call(min_seconds, |k| {
        for _ in 0..k {
            rt.copy(&src, &mut dst)?;
        }
        Ok(rt.synchronize()?)
    })?;
    drop((src, dst));
    let mut rows = Vec::new();
    for (name, w) in weights {
        let dw = rt.upload(w)?;
        let x = activations(batch, w.cols());
        let x_dev = rt.upload_f32(&x)?;
        let mut y_dev = rt.zeros_f32(batch * w.rows())?;
        let (mut gpu, mut reference) = (vec![0f32; batch * w.rows()], vec![0f32; batch * w.rows()]);
        for &bits in precisions {
            rt.matmul(&dw, bits, &x_dev, batch, &mut y_dev)?;
            rt.download(&y_dev, &mut gpu)?;
            w.matmul(bits, &x, batch, &mut reference, cpu)?;
            let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
            let err = gpu.iter().zip(&reference).fold(0f32, |m, (g, c)| m.max((g - c).abs())) / scale;
            ensure!(
                f64::from(err) <= MAX_REL_ERR,
                "{name} at {bits} bits: the GPU result is off the CPU's by {err:.2e} of its largest value"
            );
            let s = seconds_per_call(min_seconds, |k| {
                for _ in 0..k {
                    rt.matmul(&dw, bits, &x_dev, batch, &mut y_dev)?;
                }
                Ok(rt.synchronize()?)
            })?;
            rows.push(row(name, w, bits, batch, s, Some(f64::from(err)))?);
        }
    }
    Ok(GpuRun { device: rt.device_name().to_string(), copy_gb_per_s: 2.0 * (copy_len * 4) as f64 / copy_s / 1e9, rows })
}
