//! Rough timing of the bit-plane kernels (one run, median of repetitions; not a benchmark).
//! `cargo run -p kernels --release --example planar_timing [rows cols group]`
use kernels::{
    ActPath, Backend, Granularity, KernelConfig, PlanarWeight, QuantizedWeight, TieRule,
};
use std::time::Instant;

fn median_us(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (rows, cols) = (
        args.first().copied().unwrap_or(1536),
        args.get(1).copied().unwrap_or(576),
    );
    let gran = args
        .get(2)
        .map_or(Granularity::Channel, |&g| Granularity::Group(g));
    let layout = gran.layout(rows, cols).unwrap();
    let mut s = 1u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let codes = (0..rows * cols).map(|_| rnd() as u8 as i8).collect();
    let scales = (0..layout.n_scales()).map(|_| 0.01).collect();
    let qw = QuantizedWeight {
        codes,
        scales,
        layout,
    };
    let t0 = Instant::now();
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
    println!(
        "{rows}x{cols} {gran}: build {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let x: Vec<f32> = (0..64 * cols)
        .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
        .collect();
    let mut y = vec![0f32; 64 * rows];
    for n in [1usize, 16] {
        for backend in Backend::available() {
            for path in [ActPath::F32, ActPath::Int8] {
                let cfg = KernelConfig::new(backend, path, 1);
                let row: Vec<String> = (2..=8)
                    .map(|bits| {
                        let us = median_us(50, || {
                            pw.matmul(bits, &x[..n * cols], n, &mut y[..n * rows], &cfg)
                                .unwrap()
                        });
                        format!("{bits}b {us:7.1}")
                    })
                    .collect();
                println!("n={n:2} {backend:6} {path:?}: {} us", row.join(" | "));
            }
        }
    }
    // Thread spawn cost on a 576x576 matvec.
    let layout = Granularity::Channel.layout(576, 576).unwrap();
    let qw = QuantizedWeight {
        codes: vec![3; 576 * 576],
        scales: vec![0.01; 576],
        layout,
    };
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
    for threads in [1, 2] {
        let cfg = KernelConfig::new(Backend::best(), ActPath::Int8, threads);
        let us = median_us(200, || {
            pw.matvec(4, &x[..576], &mut y[..576], &cfg).unwrap()
        });
        println!(
            "576x576 matvec 4b int8 {}: threads={threads}: {us:.1} us",
            Backend::best()
        );
    }
    let us = median_us(200, || {
        std::thread::scope(|s| {
            s.spawn(|| std::hint::black_box(1));
        })
    });
    println!("empty scoped spawn+join: {us:.1} us");
}
