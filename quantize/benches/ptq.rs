//! PTQ speed on SmolLM2-135M's shapes and reconstruction errors of the scale-search objectives
//! and tie rules on Gaussian weights. `cargo bench -p quantize --bench ptq` (results in
//! docs/BENCHMARKS.md).

use kernels::{Granularity, TieRule};
use quantize::{quantize_weight, reconstruction_error, SearchObjective};

#[path = "../tests/support/random.rs"]
mod random;
use random::{gaussian, heavy_tailed, spec};

fn main() {
    let t = std::time::Instant::now();
    let spec_of = |g, o, tie| spec(&[8, 4, 2], g, tie, o);
    println!("relative error, N(0,1) 1536x576, bits [8, 4, 2]");
    let w = gaussian(1536 * 576, 42);
    for granularity in [Granularity::Channel, Granularity::Group(128), Granularity::Group(32)] {
        for tie in [TieRule::HalfEven, TieRule::HalfUp] {
            for objective in [SearchObjective::Sum, SearchObjective::Normalized] {
                let q = quantize_weight(&w, 1536, 576, &spec_of(granularity, objective, tie)).unwrap();
                let e = [8, 4, 2].map(|b| reconstruction_error(&w, &q, b, tie).unwrap());
                println!(
                    "{granularity:>10} {tie:>4} {objective:>10}: 8b {:.3e}  4b {:.3e}  2b {:.3e}",
                    e[0], e[1], e[2]
                );
            }
        }
    }
    println!("(errors took {:.1?})", t.elapsed());

    // Context: each bit-width's own optimum (a one-bit set), and the tie rules over every width,
    // with the mean signed error (bias) relative to rms(W).
    for granularity in [Granularity::Channel, Granularity::Group(128)] {
        let own: Vec<String> = [8, 4, 2]
            .iter()
            .map(|&b| {
                let q =
                    quantize_weight(&w, 1536, 576, &spec(&[b], granularity, TieRule::HalfEven, SearchObjective::Sum))
                        .unwrap();
                format!("{b}b {:.3e}", reconstruction_error(&w, &q, b, TieRule::HalfEven).unwrap())
            })
            .collect();
        println!("{granularity:>10} own optimum per bit: {}", own.join("  "));
    }
    let all = [8, 7, 6, 5, 4, 3, 2];
    let rms = (w.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    for tie in [TieRule::HalfEven, TieRule::HalfUp] {
        let q = quantize_weight(&w, 1536, 576, &spec(&all, Granularity::Channel, tie, SearchObjective::Normalized))
            .unwrap();
        let cells: Vec<String> = all
            .iter()
            .map(|&b| {
                let mean = q.dequantize(b, tie).unwrap().iter().zip(&w).map(|(&y, &x)| f64::from(y - x)).sum::<f64>()
                    / w.len() as f64;
                let e = reconstruction_error(&w, &q, b, tie).unwrap();
                format!("{b}b {e:.2e}/{:+.1e}", mean / rms)
            })
            .collect();
        println!("channel normalized [8..2] {tie:>4} rel.err/bias: {}", cells.join(" "));
    }

    // 30 layers × (q, o: 576×576; k, v: 192×576; gate, up: 1536×576; down: 576×1536) + embedding.
    let layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    let mut shapes: Vec<(usize, usize)> = (0..30).flat_map(|_| layer).collect();
    shapes.push((49152, 576));
    let total: usize = shapes.iter().map(|(r, c)| r * c).sum();
    let biggest = shapes.iter().map(|(r, c)| r * c).max().unwrap();
    let pool = heavy_tailed(biggest, 1);
    for granularity in [Granularity::Channel, Granularity::Group(128)] {
        for objective in [SearchObjective::Sum, SearchObjective::Normalized] {
            let s = spec_of(granularity, objective, TieRule::HalfEven);
            let t = std::time::Instant::now();
            for &(r, c) in &shapes {
                quantize_weight(&pool[..r * c], r, c, &s).unwrap();
            }
            println!("{total} weights, {granularity} {objective}: {:.2?}", t.elapsed());
        }
    }
}
