//! Speed of the bit-plane kernels ([`PlanarWeight::matvec`] / [`PlanarWeight::matmul`]) on
//! SmolLM2-135M's weight shapes, at every precision, against the machine's streaming read
//! bandwidth and candle's f32 and quantized (Q8_0, Q4_K) matmuls of the same shapes.
//!
//! ```text
//! cargo bench -p kernels                                  # everything: 231 benchmarks, ~1.5 s each
//! cargo bench -p kernels -- 1536x576 --quick              # one shape, criterion's quick mode
//! DRQ_BENCH_BITS=8,4,2 cargo bench -p kernels -- matvec   # only these precisions
//! ```
//!
//! How to read it: every benchmark reports a throughput in GB/s (10⁹ bytes/s) = the bytes one call
//! must read from memory / the time of one call. For the kernels that is
//! [`PlanarWeight::bytes_read`]`(bits)`: the `bits + 1` planes it touches (9 at 8 bits with the
//! HalfEven d plane) plus the f32 scales; for candle the whole weight (f32: 4 bytes per weight,
//! Q8_0: 34 bytes per 32, Q4_K: 144 bytes per 256). A memory-bound kernel approaches
//! `baseline/read_bandwidth/t1`, one core summing a 1 GiB buffer with the widest SIMD available.
//! Time per call = bytes / throughput, and the lower precisions read fewer bytes, so compare times
//! for "how much faster is 4-bit than 8-bit" and GB/s for "how close to the memory limit".
//!
//! Every benchmark rotates over copies of its weight (≥ 256 MiB resident in all, each call uses
//! the next copy), so the weight streams from DRAM as in decoding, not from the 32 MiB L3. The
//! activations stay cache-resident, as they do in a model. Before each timed batch one untimed
//! call runs (criterion's `--quick` has no warm-up, and a first call may start the kernels' worker
//! pool or allocate candle's scratch).
//!
//! Names: `matvec/{rows}x{cols}/{channel|g128|g32}/{f32|int8|int8-fine}/b{bits}/t{threads}` (one activation
//! row, [`ActPath::F32`], [`ActPath::Int8`] or [`ActPath::Int8Fine`]), `matmul16/1536x576/channel/{f32|int8|int8-fine}/b{bits}/t1`
//! (16 rows, the weight read once for all), `matmul64/1536x576/channel/f32/b{bits}/t1` (64 rows,
//! a prefill chunk), `baseline/read_bandwidth/t{1,2}`,
//! `baseline/candle_{f32,q8_0,q4_k}/{rows}x{cols}` (Q4_K needs `cols % 256 == 0`: only 576x1536
//! and 4096x4096). Kernels use [`Backend::best`]; 2 threads only for 8/4/2 bits, per-channel, on
//! 1536x576 and 4096x4096.
//!
//! Threads of candle: the bench sets `CANDLE_NUM_THREADS=1` (quantized matmul) and
//! `RAYON_NUM_THREADS=1` (f32 gemm) unless they are already set, so the baselines are
//! single-threaded like the `t1` kernels (set them to compare other thread counts). Candle's
//! quantized matmul quantizes the activation row to Q8 first (Q8_0 / Q8_K), so `candle_q8_0`
//! compares with the kernels' `int8` path.
//!
//! `DRQ_BENCH_BITS` (comma-separated, default `2,3,4,5,6,7,8`) restricts the precisions.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use kernels::{ActPath, Backend, Granularity, KernelConfig, PlanarWeight, QuantizedWeight, TieRule};
use std::cell::OnceCell;
use std::hint::black_box;
use std::time::Duration;

/// SmolLM2-135M's weights, rows × cols: q/o, k/v, gate/up, down, embedding/lm_head; and a
/// 4096² weight (a 7B-class model's) for scale.
const SHAPES: [(usize, usize); 6] = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096)];
/// The shape that also gets group:32 and the batched matmul.
const DETAIL_SHAPE: (usize, usize) = (1536, 576);
/// Shapes and precisions also measured with 2 threads (per-channel).
const THREADED_SHAPES: [(usize, usize); 2] = [(1536, 576), (4096, 4096)];
const THREADED_BITS: [u32; 3] = [8, 4, 2];
/// Activation rows of the batched matmul.
const BATCH: usize = 16;
/// Activation rows of the large batched matmul (a prefill chunk).
const BATCH_LARGE: usize = 64;
/// Bytes of weight copies each benchmark rotates over: 8× the L3, 2.7× even at 2 bits (3 of 9
/// planes read).
const RESIDENT_BYTES: usize = 256 << 20;
/// Buffer of the read-bandwidth baseline.
const READ_BYTES: usize = 1 << 30;

fn main() {
    // Before any candle call: candle reads these when it first builds its thread pools.
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "1");
        }
    }
    let bits = bench_bits();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    read_bandwidth(&mut c);
    for shape in SHAPES {
        kernels_on(&mut c, shape, &bits);
        candle_on(&mut c, shape);
    }
    c.final_summary();
}

/// The precisions to run: `DRQ_BENCH_BITS`, else 2..=8.
fn bench_bits() -> Vec<u32> {
    let Ok(list) = std::env::var("DRQ_BENCH_BITS") else {
        return (2..=8).collect();
    };
    list.split(',')
        .map(|b| match b.trim().parse() {
            Ok(b @ 2..=8) => b,
            _ => panic!("DRQ_BENCH_BITS={list:?}: expected bit-widths in 2..=8, comma-separated"),
        })
        .collect()
}

/// Copies of a weight of `bytes` bytes that fill [`RESIDENT_BYTES`] (at least 2).
fn n_copies(bytes: usize) -> usize {
    RESIDENT_BYTES.div_ceil(bytes.max(1)).max(2)
}

/// The next copy of the rotation.
fn next<'a, T>(copies: &'a [T], i: &mut usize) -> &'a T {
    *i = (*i + 1) % copies.len();
    &copies[*i]
}

/// Deterministic pseudo-random numbers (xorshift64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [−1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
}

fn shape_name((rows, cols): (usize, usize)) -> String {
    format!("{rows}x{cols}")
}

fn granularity_name(g: Granularity) -> String {
    match g {
        Granularity::Channel => "channel".into(),
        Granularity::Group(n) => format!("g{n}"),
    }
}

fn path_name(p: ActPath) -> &'static str {
    match p {
        ActPath::F32 => "f32",
        ActPath::Int8 => "int8",
        ActPath::Int8Fine => "int8-fine",
        ActPath::Auto => "auto",
    }
}

/// A random `rows × cols` weight in the bit-plane layout (HalfEven, so with the d plane).
fn planar_weight(rows: usize, cols: usize, granularity: Granularity, seed: u64) -> PlanarWeight {
    let layout = granularity.layout(rows, cols).unwrap();
    let mut rng = Rng(seed);
    let codes = (0..rows * cols).map(|_| rng.next_u64() as i8).collect();
    let scales = (0..layout.n_scales()).map(|_| 0.01 * (1.5 + rng.unit())).collect();
    let q = QuantizedWeight::new(codes, scales, layout);
    PlanarWeight::from_quantized(&q, TieRule::HalfEven).unwrap()
}

/// One weight's kernel benchmarks: the prototype, its copies (built on first use), activations
/// and outputs of up to [`BATCH_LARGE`] rows.
struct Bench<'a> {
    proto: PlanarWeight,
    /// Built on first use, so benchmarks a filter skips cost no memory.
    copies: OnceCell<Vec<PlanarWeight>>,
    x: &'a [f32],
    y: &'a mut [f32],
}

impl Bench<'_> {
    /// `y = Ŵ_b · x` for `n` activation rows, each call on the next copy.
    fn run(&mut self, group: &mut BenchmarkGroup<'_, WallTime>, id: String, n: usize, b: u32, cfg: KernelConfig) {
        let Bench { proto, copies, x, y } = self;
        let (rows, cols) = (proto.rows(), proto.cols());
        let (x, y) = (&x[..n * cols], &mut y[..n * rows]);
        group.throughput(Throughput::BytesDecimal(proto.bytes_read(b).unwrap() as u64));
        let mut i = 0;
        group.bench_function(id, |bench| {
            let ws = copies.get_or_init(|| vec![proto.clone(); n_copies(proto.resident_bytes())]);
            next(ws, &mut i).matmul(b, x, n, y, &cfg).unwrap();
            bench.iter(|| {
                next(ws, &mut i).matmul(b, x, n, y, &cfg).unwrap();
                black_box(&mut *y);
            })
        });
    }
}

/// `matvec/…` (and on [`DETAIL_SHAPE`] `matmul16/…`) for one shape.
fn kernels_on(c: &mut Criterion, shape: (usize, usize), bits: &[u32]) {
    let (rows, cols) = shape;
    let name = shape_name(shape);
    let mut granularities = vec![Granularity::Channel, Granularity::Group(128)];
    if shape == DETAIL_SHAPE {
        granularities.push(Granularity::Group(32));
    }
    let x = Rng(7).vec(BATCH_LARGE * cols, 1.0);
    let mut y = vec![0f32; BATCH_LARGE * rows];
    for granularity in granularities {
        let gname = granularity_name(granularity);
        let mut bench =
            Bench { proto: planar_weight(rows, cols, granularity, 42), copies: OnceCell::new(), x: &x, y: &mut y };

        let mut group = c.benchmark_group(format!("matvec/{name}"));
        for &b in bits {
            for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine] {
                let threaded = granularity == Granularity::Channel
                    && THREADED_SHAPES.contains(&shape)
                    && THREADED_BITS.contains(&b);
                for threads in if threaded { 1..=2 } else { 1..=1 } {
                    let id = format!("{gname}/{}/b{b}/t{threads}", path_name(path));
                    let cfg = KernelConfig::new(Backend::best(), path, threads);
                    bench.run(&mut group, id, 1, b, cfg);
                }
            }
        }
        group.finish();

        if shape == DETAIL_SHAPE && granularity == Granularity::Channel {
            let mut group = c.benchmark_group(format!("matmul{BATCH}/{name}"));
            for &b in bits {
                for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine] {
                    let id = format!("{gname}/{}/b{b}/t1", path_name(path));
                    let cfg = KernelConfig::new(Backend::best(), path, 1);
                    bench.run(&mut group, id, BATCH, b, cfg);
                }
            }
            group.finish();
            let mut group = c.benchmark_group(format!("matmul{BATCH_LARGE}/{name}"));
            for &b in bits {
                for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine] {
                    let id = format!("{gname}/{}/b{b}/t1", path_name(path));
                    let cfg = KernelConfig::new(Backend::best(), path, 1);
                    bench.run(&mut group, id, BATCH_LARGE, b, cfg);
                }
            }
            group.finish();
        }
    }
}

/// `baseline/candle_{f32,q8_0,q4_k}/…` for one shape: `x[1, cols] · Wᵀ`.
fn candle_on(c: &mut Criterion, shape: (usize, usize)) {
    let (rows, cols) = shape;
    let name = shape_name(shape);
    let dev = Device::Cpu;
    let w = Tensor::from_vec(Rng(42).vec(rows * cols, 0.05), shape, &dev).unwrap();
    let x = Tensor::from_vec(Rng(7).vec(cols, 1.0), (1, cols), &dev).unwrap();
    let mut group = c.benchmark_group("baseline");

    let bytes = rows * cols * 4;
    group.throughput(Throughput::BytesDecimal(bytes as u64));
    let copies = OnceCell::new();
    let mut i = 0;
    group.bench_function(format!("candle_f32/{name}"), |bench| {
        let ws: &Vec<Tensor> =
            copies.get_or_init(|| (0..n_copies(bytes)).map(|_| w.copy().unwrap().t().unwrap()).collect());
        black_box(x.matmul(next(ws, &mut i)).unwrap());
        bench.iter(|| black_box(x.matmul(next(ws, &mut i)).unwrap()))
    });
    drop(copies);

    for (dtype, dname) in [(GgmlDType::Q8_0, "q8_0"), (GgmlDType::Q4K, "q4_k")] {
        if !cols.is_multiple_of(dtype.block_size()) {
            continue;
        }
        let bytes = rows * cols / dtype.block_size() * dtype.type_size();
        group.throughput(Throughput::BytesDecimal(bytes as u64));
        let copies = OnceCell::new();
        let mut i = 0;
        group.bench_function(format!("candle_{dname}/{name}"), |bench| {
            let ws: &Vec<QMatMul> = copies.get_or_init(|| {
                // Quantize once (Q4_K is slow to quantize), then copy the blocks.
                let q = QTensor::quantize(&w, dtype).unwrap();
                assert_eq!(q.storage_size_in_bytes(), bytes);
                let data = q.data().unwrap();
                (0..n_copies(bytes))
                    .map(|_| {
                        let storage = QStorage::from_data(data.clone(), &dev, dtype).unwrap();
                        QMatMul::from_qtensor(QTensor::new(storage, shape).unwrap()).unwrap()
                    })
                    .collect()
            });
            black_box(next(ws, &mut i).forward(&x).unwrap());
            bench.iter(|| black_box(next(ws, &mut i).forward(&x).unwrap()))
        });
    }
    group.finish();
}

/// `baseline/read_bandwidth/t{1,2}`: summing a [`READ_BYTES`] buffer of u64 on 1 and 2 threads.
fn read_bandwidth(c: &mut Criterion) {
    let buf = OnceCell::new();
    let mut group = c.benchmark_group("baseline");
    // Tens of ms per iteration: every sample runs the same (small) number of them.
    group.sampling_mode(SamplingMode::Flat).throughput(Throughput::BytesDecimal(READ_BYTES as u64));
    for threads in [1, 2] {
        group.bench_function(format!("read_bandwidth/t{threads}"), |bench| {
            // Written, not calloc'ed: untouched pages would all map the one zero page.
            let buf: &Vec<u64> = buf.get_or_init(|| (0..READ_BYTES as u64 / 8).collect());
            black_box(sum_threads(buf, threads));
            bench.iter(|| black_box(sum_threads(buf, threads)))
        });
    }
    group.finish();
}

/// Wrapping sum of `buf`, split in `threads` contiguous shares.
fn sum_threads(buf: &[u64], threads: usize) -> u64 {
    let share = buf.len().div_ceil(threads);
    std::thread::scope(|s| {
        let mut parts = buf.chunks(share);
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts.map(|p| s.spawn(move || sum(p))).collect();
        others.into_iter().fold(sum(first), |acc, h| acc.wrapping_add(h.join().unwrap()))
    })
}

/// Wrapping sum of `buf` with the widest SIMD this CPU has.
fn sum(buf: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected.
        return unsafe { sum_avx512(buf) };
    }
    sum_scalar(buf)
}

/// Eight independent accumulators (the compiler vectorizes this for the baseline target).
fn sum_scalar(buf: &[u64]) -> u64 {
    let chunks = buf.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(0u64, |a, &v| a.wrapping_add(v));
    let mut acc = [0u64; 8];
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.wrapping_add(v);
        }
    }
    acc.iter().fold(tail, |s, &a| s.wrapping_add(a))
}

/// Four 512-bit accumulators: one 256-byte block (four cache lines) per iteration.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(buf: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let chunks = buf.chunks_exact(32);
    let tail = sum_scalar(chunks.remainder());
    let mut acc = [_mm512_setzero_si512(); 4];
    for chunk in chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: `chunk` holds 32 u64, so 8 from offset 8k are in bounds.
            let v = unsafe { _mm512_loadu_si512(chunk.as_ptr().add(8 * k).cast()) };
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let s = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    (_mm512_reduce_add_epi64(s) as u64).wrapping_add(tail)
}
