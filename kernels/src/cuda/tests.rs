use super::*;
use crate::double_rounding::{Granularity, TieRule};
use crate::planar::tests::{f32_tol, naive, random_weight, random_x, Rng};
use crate::{dequantize, ActPath, Backend, KernelConfig};

/// `spread4` of `planar.cu`: bits 0..3 of `nibble` to bit 0 of bytes 0..3.
fn spread4(nibble: u32) -> u32 {
    nibble.wrapping_mul(0x0020_4081) & 0x0101_0101
}

/// `decode4` of `planar.cu`: `u_l` of columns `4t .. 4t + 3` of word `w` of row `r`, one per byte.
fn decode4(d: &DeviceWords, has_d: bool, r: usize, w: usize, bits: u32, t: u32) -> u32 {
    let word = |p: usize| d.words[p * d.plane_stride + r * d.wpr + w];
    let mut all_ones = !0u32;
    let mut u = 0u32;
    for k in 0..bits as usize {
        let top = word(7 - k);
        all_ones &= top;
        u = 2 * u + spread4((top >> (4 * t)) & 15);
    }
    let carry = if bits < 8 {
        word(7 - bits as usize) & !all_ones
    } else if has_d {
        word(8)
    } else {
        0
    };
    u + spread4((carry >> (4 * t)) & 15)
}

/// `byte_as_float(u, i) − (2^23 + 2^(l−1))` of `planar.cu`: byte `i` placed in the mantissa of 2^23.
fn byte_q(u: u32, i: u32, bits: u32) -> f32 {
    let with_mantissa = 0x4B00_0000 | ((u >> (8 * i)) & 0xFF);
    f32::from_bits(with_mantissa) - (8_388_608.0 + (1u32 << (bits - 1)) as f32)
}

/// `q_l` of weight `(r, c)` decoded from the device words as `planar.cu` does.
fn device_code(d: &DeviceWords, has_d: bool, r: usize, c: usize, bits: u32) -> i32 {
    let (w, j) = (c / 32, (c % 32) as u32);
    byte_q(decode4(d, has_d, r, w, bits, j / 4), j % 4, bits) as i32
}

/// `planar.cu`'s arithmetic on the host, in its order: lane `i` of a row's warp takes word `i` of
/// each 32-word tile, visits its nibbles from `(t + i) mod 8`, sums `q · x` and multiplies by
/// `2^Δ · s` once where the word lies in one scale group (else each weight is scaled on its own,
/// the group index clamped), and the 32 lanes' sums are added by the xor-shuffle tree.
fn device_matmul(w: &PlanarWeight, d: &DeviceWords, bits: u32, x: &[f32], n: usize) -> Vec<f32> {
    let (rows, cols) = (w.rows(), w.cols());
    let layout = w.layout();
    let group = layout.group.min(cols);
    let n_groups = layout.n_groups();
    let scales = w.scales_at(bits);
    let step = (1u32 << (8 - bits)) as f32;
    let mut y = vec![0f32; n * rows];
    for b in 0..n {
        let xs = |c: usize| if c < cols { x[b * cols + c] } else { 0.0 };
        for r in 0..rows {
            let mut acc = [0f32; 32];
            for word in 0..d.wpr {
                let (c0, lane) = (word * 32, word % 32);
                let last = (c0 + 31).min(cols - 1);
                let one_group = c0 / group == last / group;
                let mut part = 0f32;
                for tt in 0..8 {
                    let t = (tt + lane as u32) & 7;
                    let u = decode4(d, w.has_d_plane(), r, word, bits, t);
                    for i in 0..4 {
                        let c = c0 + (4 * t + i) as usize;
                        let mut q = byte_q(u, i, bits);
                        if !one_group {
                            q *= step * scales[r * n_groups + (c / group).min(n_groups - 1)];
                        }
                        part = q.mul_add(xs(c), part);
                    }
                }
                let s = if one_group { scales[r * n_groups + c0 / group] * step } else { 1.0 };
                acc[lane] = part.mul_add(s, acc[lane]);
            }
            for offset in [16, 8, 4, 2, 1] {
                acc = std::array::from_fn(|l| acc[l] + acc[l ^ offset]);
            }
            y[b * rows + r] = acc[0];
        }
    }
    y
}

/// Weights of every layout the kernels meet: per channel, groups narrower than, equal to, wider
/// than and straddling a 32-column word, columns not a multiple of 32, rows of several 1024-column
/// tiles, and (512 × 1024) planes large enough to carry the CPU layout's gap.
fn shapes() -> Vec<(usize, usize, Granularity)> {
    vec![
        (5, 100, Granularity::Channel),
        (7, 96, Granularity::Group(16)),
        (9, 130, Granularity::Group(48)),
        (4, 256, Granularity::Group(64)),
        (3, 576, Granularity::Group(128)),
        (3, 1536, Granularity::Group(128)),
        (2, 2200, Granularity::Channel),
        (512, 1024, Granularity::Group(128)),
    ]
}

#[test]
fn device_words_decode_every_code_at_every_precision() {
    let mut rng = Rng(71);
    for (rows, cols, gran) in shapes() {
        for tie in [TieRule::HalfEven, TieRule::HalfUp] {
            let qw = random_weight(&mut rng, rows, cols, gran);
            let w = PlanarWeight::from_quantized(&qw, tie).unwrap();
            let d = device_words(&w).unwrap();
            assert_eq!(d.wpr * 32, w.cols_padded());
            assert_eq!(d.plane_stride * w.n_planes(), d.words.len());
            for bits in 2..=8 {
                let want = w.codes_at(bits).unwrap();
                for r in 0..rows {
                    for c in 0..w.cols_padded() {
                        let got = device_code(&d, w.has_d_plane(), r, c, bits);
                        // Padding columns decode to 0 at every precision.
                        let expected = if c < cols { i32::from(want[r * cols + c]) } else { 0 };
                        assert_eq!(got, expected, "{rows}x{cols} {gran} {tie} bits {bits} ({r}, {c})");
                    }
                }
            }
        }
    }
}

#[test]
fn device_arithmetic_matches_the_cpu_kernels() {
    let mut rng = Rng(72);
    let cfg = KernelConfig::new(Backend::Scalar, ActPath::F32, 1);
    for (rows, cols, gran) in shapes().into_iter().filter(|s| s.0 < 100) {
        let mut qw = random_weight(&mut rng, rows, cols, gran);
        let n_scales = qw.layout.n_scales();
        qw.corrections.insert(3, (0..n_scales).map(|_| 1.0 + 0.5 * rng.f32()).collect());
        let w = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
        let d = device_words(&w).unwrap();
        for bits in 2..=8 {
            let mut reference = vec![0f32; rows * cols];
            let scales = qw.served_scales(bits).unwrap();
            dequantize(&qw.codes, &scales, &qw.layout, bits, TieRule::HalfEven, &mut reference).unwrap();
            for n in [1, 3, 9] {
                let x = random_x(&mut rng, n * cols);
                let got = device_matmul(&w, &d, bits, &x, n);
                let mut cpu = vec![0f32; n * rows];
                w.matmul(bits, &x, n, &mut cpu, &cfg).unwrap();
                let (exact, mag) = naive(&reference, rows, cols, &x, n);
                for i in 0..n * rows {
                    let tol = 2.0 * f32_tol(cols, mag[i]);
                    assert!(
                        (f64::from(got[i]) - exact[i]).abs() <= tol && (got[i] - cpu[i]).abs() as f64 <= 2.0 * tol,
                        "{rows}x{cols} {gran} bits {bits} n {n} [{i}]: device {} cpu {} exact {}",
                        got[i],
                        cpu[i],
                        exact[i]
                    );
                }
            }
        }
    }
}

#[test]
fn launches_cover_every_row_and_activation_row() {
    for rows in [1, 7, 8, 9, 576, 1537] {
        let cfg = launch_config(rows);
        let warps = cfg.grid_dim.0 as usize * (cfg.block_dim.0 / 32) as usize;
        assert!(warps >= rows && warps < rows + WARPS as usize, "rows {rows}: {warps} warps");
    }
    for n in 1..=MAX_BATCH {
        let chunks: Vec<_> = batch_chunks(n).collect();
        let mut next = 0;
        for &(start, len) in &chunks {
            assert_eq!(start, next);
            assert!((1..=LAUNCH_ROWS).contains(&len));
            next += len;
        }
        assert_eq!(next, n);
    }
}

#[test]
fn the_ptx_declares_every_kernel_the_runtime_loads() {
    for ptx in [PLANAR_PTX, OPS_PTX] {
        assert!(ptx.contains(".target sm_80"), "PTX for the virtual architecture compute_80");
        // PTX ISA 8.x loads from CUDA 12.x's drivers on: the version the runtime checks for.
        let isa = ptx.lines().find_map(|l| l.strip_prefix(".version ")).expect("a .version line");
        let (major, minor) = isa.trim().split_once('.').unwrap();
        assert_eq!(major, "8", "PTX ISA {isa}");
        assert_eq!(MIN_DRIVER_VERSION, 12000 + 10 * minor.parse::<i32>().unwrap(), "PTX ISA {isa}");
    }
    for bits in 2..=8 {
        for kernel in ["planar_matmul_f32", "planar_rows_f32"] {
            assert!(PLANAR_PTX.contains(&format!(".entry {kernel}_b{bits}(")), "{kernel} bits {bits}");
        }
    }
    let ops = [
        "rms_norm",
        "add_assign",
        "add_bias",
        "silu_mul",
        "rope",
        "store_kv",
        "attend",
        "dense_matmul",
        "gather_rows",
        "argmax_rows",
    ];
    for op in ops {
        assert!(OPS_PTX.contains(&format!(".entry {op}(")), "{op}");
    }
}

/// Without a driver the runtime is a clear error; with one, a bad ordinal is an error and GPU 0
/// (if it opens) computes what the CPU does. `DRQ_EXPECT_GPU=1` (scripts/gpu-check.sh) makes a
/// missing GPU a failure.
#[test]
fn the_runtime_is_an_error_without_a_gpu_and_matches_the_cpu_with_one() {
    let expect_gpu = std::env::var("DRQ_EXPECT_GPU").is_ok_and(|v| v == "1");
    if expect_gpu {
        assert!(driver_available(), "DRQ_EXPECT_GPU=1 but {}", CudaError::NoDriver);
    }
    if !driver_available() {
        let err = CudaRuntime::new(0).unwrap_err();
        assert!(matches!(err, CudaError::NoDriver));
        assert!(err.to_string().contains("libcuda.so.1"), "{err}");
        return;
    }
    assert!(matches!(CudaRuntime::new(4096), Err(CudaError::Driver { .. })));
    let rt = match CudaRuntime::new(0) {
        Ok(rt) => rt,
        // A driver without a usable GPU (a container without devices) is an error as well.
        Err(e) => return assert!(!expect_gpu && matches!(e, CudaError::Driver { .. }), "{e}"),
    };
    let mut rng = Rng(73);
    let cfg = KernelConfig::new(Backend::Scalar, ActPath::F32, 1);
    for (rows, cols, gran) in shapes() {
        let qw = random_weight(&mut rng, rows, cols, gran);
        let w = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
        let dw = rt.upload(&w).unwrap();
        for bits in 2..=8 {
            for n in [1, 9] {
                let x = random_x(&mut rng, n * cols);
                let mut gpu = vec![0f32; n * rows];
                rt.matmul_host(&dw, bits, &x, n, &mut gpu).unwrap();
                let want = device_matmul(&w, &device_words(&w).unwrap(), bits, &x, n);
                let mut cpu = vec![0f32; n * rows];
                w.matmul(bits, &x, n, &mut cpu, &cfg).unwrap();
                for i in 0..n * rows {
                    let tol = 1e-4 * (1.0 + cpu[i].abs());
                    assert!(
                        (gpu[i] - want[i]).abs() <= tol,
                        "{rows}x{cols} bits {bits} [{i}]: {} vs {}",
                        gpu[i],
                        want[i]
                    );
                }
            }
        }
        let mut y = vec![0f32; 2];
        assert!(matches!(rt.matmul_host(&dw, 9, &[0.0; 0], 1, &mut y), Err(CudaError::Kernel(_))));
        // Leading rows at 5 bits, the rest at 3 (wide lm_head rows): each range as its precision.
        let (n, split) = (3, rows / 3);
        let x = random_x(&mut rng, n * cols);
        let (x_dev, mut y_dev) = (rt.upload_f32(&x).unwrap(), rt.zeros_f32(n * rows).unwrap());
        rt.matmul_rows(&dw, 0..split, 5, &x_dev, n, &mut y_dev).unwrap();
        rt.matmul_rows(&dw, split..rows, 3, &x_dev, n, &mut y_dev).unwrap();
        let mut gpu = vec![0f32; n * rows];
        rt.download(&y_dev, &mut gpu).unwrap();
        let d = device_words(&w).unwrap();
        let (wide, narrow) = (device_matmul(&w, &d, 5, &x, n), device_matmul(&w, &d, 3, &x, n));
        for i in 0..n * rows {
            let want = if i % rows < split { wide[i] } else { narrow[i] };
            assert!((gpu[i] - want).abs() <= 1e-4 * (1.0 + want.abs()), "{rows}x{cols} split [{i}]");
        }
        let bad = rt.matmul_rows(&dw, 1..rows + 1, 4, &x_dev, n, &mut y_dev);
        assert!(matches!(bad, Err(CudaError::Kernel(KernelError::RowOutOfRange { .. }))), "{bad:?}");
    }
    sampling_matches_the_host_draw(&rt, &mut rng);
}

/// `sample_rows` after `argmax_rows` picks what the host's plain sampler picks from the same
/// logits and uniforms (the greedy rows, `inv_t = 0`, their argmax).
fn sampling_matches_the_host_draw(rt: &CudaRuntime, rng: &mut Rng) {
    let (vocab, inv_t) = (1000, [0.0f32, 0.5, 1.0, 1.0, 1.4, 3.0, 10.0]);
    let rows = inv_t.len();
    let logits: Vec<f32> = (0..rows * vocab).map(|_| 4.0 * (rng.f32() - 0.5)).collect();
    // The ends of [0, 1) too: 0 takes the first token, 0.999999 one of the last.
    let u: Vec<f64> = (0..rows).map(|r| [f64::from(rng.f32()).abs(), 0.0, 0.999_999][r % 3]).collect();
    let argmax: Vec<u32> = logits
        .chunks(vocab)
        .map(|row| row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b }) as u32)
        .collect();
    let host: Vec<u32> = logits
        .chunks(vocab)
        .zip(inv_t.iter().zip(&u))
        .zip(&argmax)
        .map(|((row, (&t, &u)), &argmax)| {
            if t == 0.0 {
                return argmax;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f32> = row.iter().map(|&l| ((l - max) * t).exp()).collect();
            let mut target = u * w.iter().map(|&w| f64::from(w)).sum::<f64>();
            for (i, &w) in w.iter().enumerate() {
                target -= f64::from(w);
                if target <= 0.0 {
                    return i as u32;
                }
            }
            argmax
        })
        .collect();
    let logits_dev = rt.upload_f32(&logits).unwrap();
    let (mut inv_t_dev, mut u_dev, mut out) =
        (rt.zeros_f32(rows).unwrap(), rt.zeros_f64(rows).unwrap(), rt.zeros_u32(rows).unwrap());
    rt.write_prefix(&inv_t, &mut inv_t_dev).unwrap();
    rt.write_prefix(&u, &mut u_dev).unwrap();
    rt.argmax_rows(&logits_dev, rows, vocab, &mut out).unwrap();
    rt.sample_rows(&logits_dev, rows, vocab, &inv_t_dev, &u_dev, &mut out).unwrap();
    let mut picked = vec![0u32; rows];
    rt.download_u32_prefix(&out, &mut picked).unwrap();
    assert_eq!(picked, host, "uniforms {u:?}");
    // Over 1,000 logits within 4 of each other, the sampled rows are not their argmax.
    assert!(picked.iter().zip(&argmax).filter(|(p, a)| p != a).count() >= 5, "{picked:?} {argmax:?}");
    let short = rt.zeros_f64(rows - 1).unwrap();
    assert!(rt.sample_rows(&logits_dev, rows, vocab, &inv_t_dev, &short, &mut out).is_err());
}

/// The on-GPU test above, run again in a child process whose `libcuda.so.1` is the emulated driver
/// ([`super::emulation`]): every upload, launch and range check of the runtime, with the kernels'
/// source run on the CPU, where there is no GPU.
#[test]
fn the_runtime_on_the_emulated_driver_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let lib = super::emulation::build_driver(dir.path()).unwrap();
    let test = "cuda::tests::the_runtime_is_an_error_without_a_gpu_and_matches_the_cpu_with_one";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads", "1"])
        .env("LD_LIBRARY_PATH", &lib)
        .env("DRQ_EXPECT_GPU", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "{stdout}");
}

/// Builds `kernels/cuda/emulate/{name}.cpp` (the CUDA source with `cuda_shim.h`, run on the CPU)
/// with the host C++ compiler (`$CXX`, else `c++`) into `dir`.
pub(crate) fn build_emulator(name: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/emulate").join(format!("{name}.cpp"));
    let exe = dir.join(name);
    super::emulation::compile(&src, &exe, false).unwrap();
    exe
}

/// Runs an emulator built by [`build_emulator`] on `input`, returning its stdout.
pub(crate) fn run_emulator(exe: &std::path::Path, input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new(exe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}: {}", exe.display(), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// `planar.cu` itself, run on the CPU through `cuda_shim.h` with the launches `CudaRuntime::matmul`
/// makes, gives bit for bit what the host replay of its arithmetic gives, for every layout,
/// precision and batch chunking.
#[test]
fn the_cuda_source_run_on_the_cpu_matches_its_host_replay() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_emulator("planar_main", dir.path());
    let mut rng = Rng(74);
    for (rows, cols, gran) in shapes() {
        let mut qw = random_weight(&mut rng, rows, cols, gran);
        let n_scales = qw.layout.n_scales();
        qw.corrections.insert(4, (0..n_scales).map(|_| 1.0 + 0.5 * rng.f32()).collect());
        let w = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
        let d = device_words(&w).unwrap();
        // Each emulated block is 256 threads: the large weight (64 blocks) at one precision, batch 1.
        let (precisions, batches): (&[u32], &[usize]) =
            if rows > 100 { (&[4], &[1]) } else { (&[2, 3, 4, 5, 6, 7, 8], &[1, 9]) };
        // The whole weight, and (on the small shapes) a row range as wide lm_head rows launch it.
        let ranges = [0..rows, rows / 3..rows - 1];
        let ranges = if rows > 100 { &ranges[..1] } else { &ranges[..] };
        for &bits in precisions {
            for &n in batches {
                for range in ranges {
                    let x = random_x(&mut rng, n * cols);
                    let layout = w.layout();
                    let header = [
                        bits,
                        rows as u32,
                        cols as u32,
                        d.wpr as u32,
                        d.plane_stride as u32,
                        layout.n_groups() as u32,
                        layout.group.min(cols) as u32,
                        u32::from(w.has_d_plane()),
                        n as u32,
                        d.words.len() as u32,
                        range.start as u32,
                        range.end as u32,
                    ];
                    let mut input: Vec<u8> = header.iter().chain(&d.words).flat_map(|v| v.to_le_bytes()).collect();
                    input.extend(w.scales_at(bits).iter().chain(&x).flat_map(|v| v.to_le_bytes()));
                    let got = f32s(&run_emulator(&exe, &input));
                    let mut want = device_matmul(&w, &d, bits, &x, n);
                    // Rows outside the launched range are not written (the emulator's y starts at 0).
                    for (i, v) in want.iter_mut().enumerate() {
                        if !range.contains(&(i % rows)) {
                            *v = 0.0;
                        }
                    }
                    assert_eq!(got.len(), want.len());
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "{rows}x{cols} {gran} bits {bits} n {n} rows {range:?} [{i}]: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
}

/// An array handed to `ops_main` and back.
#[derive(Debug, Clone)]
enum Arr {
    F(Vec<f32>),
    U(Vec<u32>),
}

impl Arr {
    fn f(&self) -> &[f32] {
        match self {
            Arr::F(v) => v,
            Arr::U(_) => panic!("not an f32 array"),
        }
    }
    fn u(&self) -> &[u32] {
        match self {
            Arr::U(v) => v,
            Arr::F(_) => panic!("not a u32 array"),
        }
    }
}

/// Runs kernel `op` of `ops_main.cpp` (see its header) and returns its arrays as the kernel left them.
fn emulate_op(exe: &std::path::Path, op: u32, scalars: &[u32], arrays: &[Arr]) -> Vec<Arr> {
    let mut words = vec![op, scalars.len() as u32];
    words.extend(scalars);
    words.push(arrays.len() as u32);
    for a in arrays {
        match a {
            Arr::F(v) => words.extend([0, v.len() as u32].into_iter().chain(v.iter().map(|x| x.to_bits()))),
            Arr::U(v) => words.extend([1, v.len() as u32].into_iter().chain(v.iter().copied())),
        }
    }
    let input: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let out = run_emulator(exe, &input);
    let mut at = 0;
    arrays
        .iter()
        .map(|a| {
            let mut take = |len: usize| {
                let v: Vec<u32> =
                    out[at..at + 4 * len].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
                at += 4 * len;
                v
            };
            match a {
                Arr::F(v) => Arr::F(take(v.len()).into_iter().map(f32::from_bits).collect()),
                Arr::U(v) => Arr::U(take(v.len())),
            }
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what} [{i}]: {g} vs {w}");
    }
}

/// `ops.cu` (and `planar.cu`'s row gather) run on the CPU through `cuda_shim.h` compute what the
/// CPU ops compute: within f32 rounding where the order of sums or `exp` differ, bit for bit
/// where they cannot.
#[test]
fn the_ops_source_run_on_the_cpu_matches_the_cpu_ops() {
    use crate::ops::{self, AttentionShape, CacheView};
    let dir = tempfile::tempdir().unwrap();
    let exe = build_emulator("ops_main", dir.path());
    let b = Backend::Scalar;
    let mut rng = Rng(75);

    for h in [100, 576] {
        let (rows, eps) = (3, 1e-5f32);
        let (x, w) = (random_x(&mut rng, rows * h), random_x(&mut rng, h));
        let mut want = vec![0f32; rows * h];
        ops::rms_norm(b, &x, &w, eps, &mut want);
        let out = emulate_op(
            &exe,
            0,
            &[rows as u32, h as u32, eps.to_bits()],
            &[Arr::F(x), Arr::F(w), Arr::F(vec![0.0; rows * h])],
        );
        assert_close(out[2].f(), &want, 1e-5, "rms_norm");
    }

    let n = 1000;
    let (x, y) = (random_x(&mut rng, n), random_x(&mut rng, n));
    let mut want = x.clone();
    ops::add_assign(b, &mut want, &y);
    let out = emulate_op(&exe, 1, &[n as u32], &[Arr::F(x.clone()), Arr::F(y.clone())]);
    assert_eq!(out[0].f(), &want[..], "add_assign");
    let width = 40;
    let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + y[i % width]).collect();
    let out = emulate_op(&exe, 2, &[n as u32, width as u32], &[Arr::F(x.clone()), Arr::F(y[..width].to_vec())]);
    assert_eq!(out[0].f(), &want[..], "add_bias");
    let mut want = x.clone();
    ops::silu_mul(b, &mut want, &y);
    let out = emulate_op(&exe, 3, &[n as u32], &[Arr::F(x), Arr::F(y)]);
    assert_close(out[0].f(), &want, 1e-5, "silu_mul");

    let (heads, kv_heads, d, positions) = (9, 3, 64, 8);
    let half = d / 2;
    let (cos, sin) = (random_x(&mut rng, positions * half), random_x(&mut rng, positions * half));
    let pos = vec![0u32, 7];
    let x = random_x(&mut rng, 2 * heads * d);
    let mut want = x.clone();
    for (r, &p) in pos.iter().enumerate() {
        let p = p as usize;
        ops::rope(b, &mut want[r * heads * d..][..heads * d], d, &cos[p * half..][..half], &sin[p * half..][..half]);
    }
    let out = emulate_op(&exe, 4, &[2, heads as u32, d as u32], &[Arr::F(x), Arr::U(pos), Arr::F(cos), Arr::F(sin)]);
    assert_close(out[0].f(), &want, 1e-6, "rope");

    // Attention: slot 0 at position 5 (positions 0..5 already cached), slot 1 at positions 0 and
    // 1 in the same step (the second sees the first's key and value).
    let shape = AttentionShape { heads, kv_heads, head_dim: d };
    let (kv_dim, capacity, slots) = (shape.kv_dim(), 20, 2);
    let (slot, pos) = (vec![0u32, 1, 1], vec![5u32, 0, 1]);
    let rows = slot.len();
    let q = random_x(&mut rng, rows * heads * d);
    let (k, v) = (random_x(&mut rng, rows * kv_dim), random_x(&mut rng, rows * kv_dim));
    let (mut kcache, mut vcache) =
        (random_x(&mut rng, slots * capacity * kv_dim), random_x(&mut rng, slots * capacity * kv_dim));
    let scale = 1.0 / (d as f32).sqrt();
    let out = emulate_op(
        &exe,
        5,
        &[rows as u32, heads as u32, kv_heads as u32, d as u32, capacity as u32, scale.to_bits()],
        &[
            Arr::F(q.clone()),
            Arr::F(k.clone()),
            Arr::F(v.clone()),
            Arr::U(slot.clone()),
            Arr::U(pos.clone()),
            Arr::F(kcache.clone()),
            Arr::F(vcache.clone()),
            Arr::F(vec![0.0; rows * heads * capacity]),
            Arr::F(vec![0.0; rows * heads * d]),
        ],
    );
    for r in 0..rows {
        let at = (slot[r] as usize * capacity + pos[r] as usize) * kv_dim;
        kcache[at..at + kv_dim].copy_from_slice(&k[r * kv_dim..][..kv_dim]);
        vcache[at..at + kv_dim].copy_from_slice(&v[r * kv_dim..][..kv_dim]);
    }
    assert_eq!(out[5].f(), &kcache[..], "store_kv keys");
    assert_eq!(out[6].f(), &vcache[..], "store_kv values");
    for r in 0..rows {
        let (len, stride) = (pos[r] as usize + 1, 32);
        let base = slot[r] as usize * capacity * kv_dim;
        let mut keys = vec![0f32; kv_dim * stride];
        for p in 0..len {
            ops::store_key(&mut keys, stride, p, &kcache[base + p * kv_dim..][..kv_dim]);
        }
        let values = &vcache[base..base + len * kv_dim];
        let mut want = vec![0f32; heads * d];
        let cache = CacheView { keys: &keys, stride, values, len };
        ops::attend(b, shape, &q[r * heads * d..][..heads * d], cache, &mut vec![0f32; stride], &mut want);
        assert_close(&out[8].f()[r * heads * d..][..heads * d], &want, 1e-5, &format!("attend row {r}"));
    }

    let (rows, cols, n) = (10, 100, 3);
    let (w, x) = (random_x(&mut rng, rows * cols), random_x(&mut rng, n * cols));
    let (want, _) = naive(&w, rows, cols, &x, n);
    let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    let out = emulate_op(
        &exe,
        6,
        &[rows as u32, cols as u32, n as u32],
        &[Arr::F(w), Arr::F(x), Arr::F(vec![0.0; n * rows])],
    );
    assert_close(out[2].f(), &want, 1e-5, "dense_matmul");

    let (vocab, cols) = (7, 5);
    let table = random_x(&mut rng, vocab * cols);
    let ids = vec![6u32, 0, 3, 3];
    let out = emulate_op(
        &exe,
        7,
        &[ids.len() as u32, cols as u32],
        &[Arr::F(table.clone()), Arr::U(ids.clone()), Arr::F(vec![0.0; ids.len() * cols])],
    );
    let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * cols..][..cols].to_vec()).collect();
    assert_eq!(out[2].f(), &want[..], "gather_rows");

    let vocab = 1000;
    let mut logits = random_x(&mut rng, 2 * vocab);
    logits[vocab + 17] = 50.0;
    logits[vocab + 17 + 256] = 50.0; // a tie within one thread's share: the first index wins
    logits[vocab + 900] = 50.0; // and across threads
    let out = emulate_op(&exe, 8, &[2, vocab as u32], &[Arr::F(logits.clone()), Arr::U(vec![0; 2])]);
    let first_max =
        |row: &[f32]| row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best }) as u32;
    assert_eq!(out[1].u(), &[first_max(&logits[..vocab]), 17], "argmax_rows");

    for (rows, cols, gran) in shapes().into_iter().filter(|s| s.0 < 100) {
        let qw = random_weight(&mut rng, rows, cols, gran);
        let w = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
        let d = device_words(&w).unwrap();
        let ids: Vec<u32> = vec![rows as u32 - 1, 0, (rows / 2) as u32];
        let idx: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let lookup = |bits: u32, range: std::ops::Range<usize>, out: Vec<f32>| {
            let layout = w.layout();
            let scalars = [
                bits,
                ids.len() as u32,
                d.plane_stride as u32,
                d.wpr as u32,
                layout.n_groups() as u32,
                layout.group.min(cols) as u32,
                cols as u32,
                u32::from(w.has_d_plane()),
                range.start as u32,
                range.end as u32,
            ];
            let arrays =
                [Arr::U(d.words.clone()), Arr::F(w.scales_at(bits).to_vec()), Arr::U(ids.clone()), Arr::F(out)];
            emulate_op(&exe, 9, &scalars, &arrays)[3].f().to_vec()
        };
        for bits in 2..=8 {
            let mut want = vec![0f32; ids.len() * cols];
            w.dequantize_rows(bits, &idx, &mut want).unwrap();
            let got = lookup(bits, 0..rows, vec![0.0; ids.len() * cols]);
            assert_eq!(got, want, "planar_rows {rows}x{cols} {gran} bits {bits}");
        }
        // Wide leading rows: rows below `split` at 6 bits, the rest at 3, one launch each.
        let split = rows / 2 + 1;
        let (mut wide, mut narrow) = (vec![0f32; ids.len() * cols], vec![0f32; ids.len() * cols]);
        w.dequantize_rows(6, &idx, &mut wide).unwrap();
        w.dequantize_rows(3, &idx, &mut narrow).unwrap();
        let want: Vec<f32> = idx
            .iter()
            .enumerate()
            .flat_map(|(k, &i)| if i < split { &wide[k * cols..][..cols] } else { &narrow[k * cols..][..cols] })
            .copied()
            .collect();
        let got = lookup(3, split..rows, lookup(6, 0..split, vec![0.0; ids.len() * cols]));
        assert_eq!(got, want, "planar_rows {rows}x{cols} {gran}, rows 0..{split} at 6 bits, the rest at 3");
    }
}
