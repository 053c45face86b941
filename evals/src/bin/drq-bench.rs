//! `drq-bench`: greedy decoding speed of a checkpoint at several precisions through the serving
//! runtime (`Transformer::forward_batch`, what `drq-serve` runs), from one resident copy, with
//! the process's peak resident memory. Optionally the float model on candle as a baseline in the
//! same run, and candle's own Llama and quantized Llama (`--candle`, on the CPU or a GPU) as
//! baselines. With `--kernels`, the matmul kernels alone on the checkpoint's weight shapes, on the
//! CPU or (`--device cuda`) on a GPU (`evals::kernel_bench`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use clap::Parser;
use cli::Activations;
use evals::candle_baseline::{CandleModel, CandleWeights};
use evals::kernel_bench;
use kernels::KernelConfig;
use model::checkpoint::Checkpoint;
use model::source::{self, ModelSource};
use model::transformer::cuda::{CudaTransformer, GpuResident, GpuRow};
use model::{precision, Batch, KvCache, OpsMode, Precision, ResidentModel, SequenceStep, Transformer};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "drq-bench",
    version,
    about = "Greedy decoding tokens/s per precision from one resident checkpoint, and peak memory"
)]
struct Args {
    /// A drq checkpoint (optional with --kernels).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Float model (any source) for an `fp` baseline row on candle.
    #[arg(long)]
    reference: Option<String>,
    /// Precisions: bit-widths 2..8 (and `fp` with --reference), comma-separated.
    #[arg(short, long, default_value = "8,4,2")]
    precision: String,
    /// Prompt tokens per sequence (prefilled in one step).
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Sequences decoded together (batched decoding, as the server does).
    #[arg(short, long, default_value_t = 1)]
    batch: usize,
    /// Kernel threads (default: every core).
    #[arg(short, long, default_value_t = cli::cores())]
    threads: usize,
    #[arg(long, value_enum, default_value = "auto")]
    activations: Activations,
    /// Also decode `--batch` sequences at every quantized precision listed, all in the same
    /// steps, as a server with mixed requests does: two more rows, `mixed 8/4/2 (one pass)`
    /// (`Transformer::forward_batches`: one pass of the kernels over each weight for every
    /// precision, what `drq-serve` runs) and `(per precision)` (one `forward_batch` per
    /// precision after the other); tokens/s are the aggregate of all sequences.
    #[arg(long)]
    mixed: bool,
    /// Runs per precision; the median is reported.
    #[arg(short, long, default_value_t = 3)]
    repeat: usize,
    /// Measure the matmul kernels alone instead of decoding: every distinct weight shape of the
    /// checkpoint (or of `--shapes` without one) and a 4096x4096 weight, at each precision with
    /// `--batch` activation rows (≤ 64): µs per call and GB/s of plane bytes read.
    #[arg(long)]
    kernels: bool,
    /// `--kernels` without a checkpoint: weight shapes `ROWSxCOLS`, random codes, scales per 128
    /// columns (default: SmolLM2-135M's projections and lm_head, and 4096x4096).
    #[arg(long, default_value = "576x576,192x576,1536x576,576x1536,49152x576,4096x4096")]
    shapes: String,
    /// `cpu`, or `cuda` / `cuda:N`: decode on that GPU (the whole step on the device, f32
    /// activations; the first sequence's greedy tokens compared with the CPU's), or with
    /// `--kernels` time the GPU kernels (each result checked against the CPU's, a device-to-device
    /// copy as the bandwidth baseline). Needs only the NVIDIA driver.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// candle's own models as baselines in the same run, a row each: `f32`, `f16`, `bf16`
    /// (candle-transformers' Llama over `--reference`'s weights) or `q8_0`, `q4_0`, `q4_1` (its
    /// quantized Llama and `QMatMul` kernels over `--reference`, a GGUF file, re-quantized by
    /// candle), decoding the same prompts on `--device` (a GPU needs candle's CUDA backend: a
    /// binary from scripts/build-cuda.sh). candle's CPU threads follow RAYON_NUM_THREADS, set to
    /// `--threads` when unset.
    #[arg(long, value_delimiter = ',')]
    candle: Vec<CandleWeights>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    precision: String,
    batch: usize,
    /// `None`: the prompts could not be prefilled in one step (candle's quantized Llama, batch > 1).
    prefill_tokens_per_s: Option<f64>,
    decode_tokens_per_s: f64,
    ms_per_step: f64,
    /// `--device cuda`: generated tokens of the first sequence equal to the CPU's greedy decode
    /// before the first difference.
    greedy_equal_to_cpu: Option<usize>,
}

impl Row {
    /// The row of the median of `runs` (seconds of the prefill, `None` where it was not one step,
    /// and of the decode steps) of `sequences` sequences decoded together.
    fn median(precision: String, sequences: usize, args: &Args, mut runs: Vec<(Option<f64>, f64)>) -> Row {
        runs.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (prefill, decode_s) = runs[runs.len() / 2];
        let steps = (args.gen_tokens - 1) as f64;
        Row {
            precision,
            batch: sequences,
            prefill_tokens_per_s: prefill.map(|s| (sequences * args.prompt_tokens) as f64 / s),
            decode_tokens_per_s: steps * sequences as f64 / decode_s,
            ms_per_step: decode_s / steps * 1e3,
            greedy_equal_to_cpu: None,
        }
    }
}

/// Text the prompts are cut from (different offsets per sequence).
const TEXT: &str = "The lighthouse stood at the edge of the world, where the grey sea met a sky that never \
quite decided whether to rain. Every evening the keeper climbed the one hundred and twelve steps, \
trimmed the wick, polished the great lens and watched the beam sweep across the water. Ships passed \
rarely now; most of them carried their own lights and their own maps, and had no need of an old man \
and his lamp. Still he climbed, because a light that is kept is a promise, and promises are not \
broken just because nobody seems to be listening.";

fn main() {
    cli::run_main(|| run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    ensure!(
        args.batch >= 1 && args.prompt_tokens >= 1 && args.gen_tokens >= 1 && args.repeat >= 1,
        "batch, token counts and repeat must be at least 1"
    );
    ensure!(args.threads >= 1, "--threads must be at least 1");
    let precisions = precision::parse_list(&args.precision)?;
    let gpu = cli::gpu_ordinal(&args.device)?;
    ensure!(
        !(args.mixed && gpu.is_some()),
        "--mixed runs on the CPU (one step across precisions is not built for the GPU)"
    );
    if let Some(path) = &args.json {
        cli::check_output_dir("--json", path)?;
    }
    let candle_device = if args.candle.is_empty() {
        None
    } else {
        ensure!(!args.kernels, "--candle decodes with candle's models; --kernels times drq's kernels alone");
        ensure!(
            args.reference.is_some(),
            "--candle needs --reference (the float model, a GGUF file for q8_0/q4_0/q4_1)"
        );
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            // Read by candle when its thread pool starts (the first candle op, after this).
            std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
        }
        Some(cli::parse_device(&args.device)?)
    };
    let kernel = KernelConfig { path: args.activations.path(), threads: args.threads, ..KernelConfig::default() };
    if args.kernels {
        return bench_kernels(&args, &precisions, gpu, &kernel);
    }
    let Some(model) = &args.model else { bail!("--model is required (except with --kernels)") };
    let checkpoint = Checkpoint::open(model)?;
    let config = checkpoint.config().clone();
    ensure!(
        args.prompt_tokens + args.gen_tokens <= config.max_position_embeddings,
        "prompt + generated tokens exceed the model's context of {}",
        config.max_position_embeddings
    );
    let tokenizer = checkpoint.tokenizer()?;
    let text_ids = tokenizer.encode(TEXT, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
    ensure!(!text_ids.is_empty(), "the built-in text has no tokens");
    // Prompt b starts at token b of the text, which repeats as long as needed (pp128 and longer).
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|b| (0..args.prompt_tokens).map(|i| text_ids[(b + i) % text_ids.len()]).collect())
        .collect();

    let started = Instant::now();
    let resident = ResidentModel::from_checkpoint(&checkpoint)?;
    drop(checkpoint);
    tracing::info!(
        "resident weights: {:.1} MiB, built in {:.1}s",
        resident.resident_bytes() as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let float = match &args.reference {
        Some(src) => Some(source::load_float(&src.parse::<ModelSource>()?)?.0),
        None => None,
    };
    let mut gpu = match gpu {
        Some(ordinal) => {
            ensure!(args.batch <= kernels::MAX_BATCH, "--device cuda: --batch must be at most {}", kernels::MAX_BATCH);
            let rt = kernels::cuda::CudaRuntime::new(ordinal)?;
            tracing::info!("GPU {ordinal}: {}", rt.device_name());
            Some(GpuResident::new(std::sync::Arc::new(rt)))
        }
        None => None,
    };
    let mut rows = Vec::new();
    for p in &precisions {
        let transformer = match (p, &float) {
            (Precision::Float, _) if gpu.is_some() => {
                bail!("--device cuda serves the checkpoint's precisions, not `fp`")
            }
            (Precision::Float, Some(f)) => Transformer::new(&f.config, &f.weights, OpsMode::Inference)?,
            (Precision::Float, None) => bail!("`fp` needs --reference"),
            (p, _) => Transformer::from_resident(&resident, p, &kernel)?,
        };
        let mut agreement = None;
        let runs: Vec<(f64, f64)> = match &mut gpu {
            None => (0..args.repeat)
                .map(|_| decode(&[&transformer], &prompts, args.gen_tokens, false))
                .collect::<Result<_>>()?,
            Some(gpu) => {
                let on_gpu = transformer.to_cuda(gpu)?;
                let mut runs = Vec::new();
                let mut gpu_tokens = Vec::new();
                for _ in 0..args.repeat {
                    let (prefill, decode_s, tokens) = decode_gpu(&on_gpu, &prompts, args.gen_tokens)?;
                    runs.push((prefill, decode_s));
                    gpu_tokens = tokens;
                }
                // The GPU computes with f32 activations: compare with the CPU's f32 path.
                let f32_kernel = KernelConfig { path: kernels::ActPath::F32, ..kernel };
                let on_cpu = Transformer::from_resident(&resident, p, &f32_kernel)?;
                let cpu_tokens = greedy_cpu(&on_cpu, &prompts[0], args.gen_tokens)?;
                let same = gpu_tokens.iter().zip(&cpu_tokens).take_while(|(a, b)| a == b).count();
                agreement = Some(same);
                runs
            }
        };
        let runs = runs.into_iter().map(|(prefill, decode_s)| (Some(prefill), decode_s)).collect();
        rows.push(Row { greedy_equal_to_cpu: agreement, ..Row::median(p.to_string(), args.batch, &args, runs) });
    }
    if let Some(device) = &candle_device {
        let reference = args.reference.as_deref().expect("checked with --candle");
        for &weights in &args.candle {
            rows.push(candle_row(reference, float.as_ref(), weights, device, &prompts, &args)?);
        }
    }
    let quantized: Vec<&Precision> = precisions.iter().filter(|p| **p != Precision::Float).collect();
    if args.mixed {
        ensure!(quantized.len() >= 2, "--mixed needs at least two quantized precisions");
        let transformers =
            quantized.iter().map(|p| Transformer::from_resident(&resident, p, &kernel)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Transformer> = transformers.iter().collect();
        let label = quantized.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("/");
        for (together, how) in [(true, "one pass"), (false, "per precision")] {
            let runs = (0..args.repeat)
                .map(|_| decode(&refs, &prompts, args.gen_tokens, together).map(|(p, d)| (Some(p), d)))
                .collect::<Result<_>>()?;
            let label = format!("mixed {label} ({how})");
            rows.push(Row::median(label, args.batch * transformers.len(), &args, runs));
        }
    }
    let peak = peak_rss_bytes();
    let runtime = match &gpu {
        Some(g) => format!("GPU {} (f32 activations)", g.runtime().device_name()),
        None => {
            format!("{} thread(s), {} activations, backend {}", args.threads, args.activations.name(), kernel.backend)
        }
    };
    println!(
        "{} | {} prompt + {} generated tokens, batch {}, {runtime}, median of {}",
        model.display(),
        args.prompt_tokens,
        args.gen_tokens,
        args.batch,
        args.repeat
    );
    let width = rows.iter().map(|r| r.precision.len()).max().unwrap_or(0).max(9);
    println!("{:>width$} {:>14} {:>14} {:>11}", "precision", "prefill tok/s", "decode tok/s", "ms/step");
    for r in &rows {
        let agreement = r
            .greedy_equal_to_cpu
            .map(|n| format!("   greedy tokens equal to the CPU's: {n}/{}", args.gen_tokens))
            .unwrap_or_default();
        let prefill = r.prefill_tokens_per_s.map_or("—".to_string(), |v| format!("{v:.1}"));
        println!(
            "{:>width$} {prefill:>14} {:>14.1} {:>11.2}{agreement}",
            r.precision, r.decode_tokens_per_s, r.ms_per_step
        );
    }
    if let Some(peak) = peak {
        println!(
            "peak resident memory: {:.1} MiB (one resident copy serves every precision above)",
            peak as f64 / (1 << 20) as f64
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "model": model, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "batch": args.batch,
            "threads": args.threads, "backend": kernel.backend.name(), "repeat": args.repeat, "rows": rows, "peak_rss_bytes": peak,
        });
        cli::write_atomically(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}

/// A row for candle's model with `weights` (see `--candle`) decoding `prompts` on `device`.
fn candle_row(
    reference: &str,
    float: Option<&model::source::FloatModel>,
    weights: CandleWeights,
    device: &candle_core::Device,
    prompts: &[Vec<u32>],
    args: &Args,
) -> Result<Row> {
    let started = Instant::now();
    let mut candle = match weights {
        CandleWeights::F32 | CandleWeights::F16 | CandleWeights::Bf16 => {
            let Some(float) = float else { bail!("--candle {}: needs --reference", weights.name()) };
            CandleModel::float(float, weights, device)?
        }
        _ => match reference.parse::<ModelSource>()? {
            ModelSource::Gguf(path) => CandleModel::quantized(&path, weights, device)?,
            _ => bail!(
                "--candle {}: candle's quantized Llama reads a GGUF file; --reference {reference} is not one",
                weights.name()
            ),
        },
    };
    tracing::info!("candle {} on {device:?}: loaded in {:.1}s", weights.name(), started.elapsed().as_secs_f64());
    let runs = (0..args.repeat)
        .map(|_| candle.greedy(prompts, args.gen_tokens).map(|(p, d, _)| (p, d)))
        .collect::<Result<_>>()?;
    Ok(Row::median(format!("candle {}", weights.name()), args.batch, args, runs))
}

/// Greedy decoding on the GPU of every prompt at once: the prompts' positions, then `gen - 1`
/// steps of one row per sequence. Returns the seconds of the
/// prefill and of the decode steps, and the tokens generated for the first sequence.
fn decode_gpu(t: &CudaTransformer, prompts: &[Vec<u32>], gen: usize) -> Result<(f64, f64, Vec<u32>)> {
    let prompt_len = prompts[0].len();
    let mut arena = t.kv_arena(prompts.len(), prompt_len + gen)?;
    let rows: Vec<GpuRow> = prompts.iter().enumerate().flat_map(|(slot, p)| GpuRow::sequence(slot, 0, p)).collect();
    let started = Instant::now();
    let mut next = t.step_greedy(&mut arena, &rows)?;
    let prefill = started.elapsed().as_secs_f64();
    let mut first = vec![next[0]];
    let started = Instant::now();
    for i in 1..gen {
        let rows: Vec<GpuRow> = next
            .iter()
            .enumerate()
            .map(|(slot, &token)| GpuRow { slot, pos: prompt_len + i - 1, token, pick: true })
            .collect();
        next = t.step_greedy(&mut arena, &rows)?;
        first.push(next[0]);
    }
    Ok((prefill, started.elapsed().as_secs_f64(), first))
}

/// The `gen` greedy tokens after `prompt` on the CPU runtime.
fn greedy_cpu(t: &Transformer, prompt: &[u32], gen: usize) -> Result<Vec<u32>> {
    let mut cache = KvCache::new(t.config());
    let mut input = prompt.to_vec();
    let mut out = Vec::with_capacity(gen);
    for _ in 0..gen {
        let logits = t.forward_batch(&mut [SequenceStep { tokens: &input, cache: &mut cache }])?;
        let id = argmax_rows(&logits)?[0];
        out.push(id);
        input = vec![id];
    }
    Ok(out)
}

/// `--kernels`: the matmul kernels on the checkpoint's weight shapes, on the CPU or a GPU.
fn bench_kernels(args: &Args, precisions: &[Precision], gpu: Option<usize>, kernel: &KernelConfig) -> Result<()> {
    let bits = precisions
        .iter()
        .map(|p| match p {
            Precision::Bits(b) => Ok(*b),
            other => bail!("--kernels measures bit-widths; {other} is not one"),
        })
        .collect::<Result<Vec<u32>>>()?;
    ensure!((1..=kernels::MAX_BATCH).contains(&args.batch), "--kernels: --batch must be 1..={}", kernels::MAX_BATCH);
    let (source, weights) = match &args.model {
        Some(path) => {
            let resident = ResidentModel::from_checkpoint(&Checkpoint::open(path)?)?;
            (path.display().to_string(), kernel_bench::weights(&resident)?)
        }
        None => {
            ("random weights".to_string(), kernel_bench::synthetic_weights(&kernel_bench::parse_shapes(&args.shapes)?)?)
        }
    };
    const MIN_SECONDS: f64 = 0.2;
    let (device, copy, rows) = match gpu {
        None => {
            let rows = kernel_bench::run_cpu(&weights, &bits, args.batch, kernel, MIN_SECONDS)?;
            (
                format!(
                    "CPU, {} backend, {} thread(s), {} activations",
                    kernel.backend,
                    args.threads,
                    args.activations.name()
                ),
                None,
                rows,
            )
        }
        Some(ordinal) => {
            let run = kernel_bench::run_cuda(&weights, &bits, args.batch, ordinal, kernel, MIN_SECONDS)?;
            (format!("{}, f32 activations", run.device), Some(run.copy_gb_per_s), run.rows)
        }
    };
    println!("{source} | matmul kernels, batch {} | {device}", args.batch);
    if let Some(copy) = copy {
        println!("device-to-device copy: {copy:.0} GB/s (bytes read + written)");
    }
    let width = rows.iter().map(|r| r.weight.len()).max().unwrap_or(0).max(6);
    println!(
        "{:>width$} {:>11} {:>4} {:>10} {:>9} {:>12}",
        "weight", "rows x cols", "bits", "µs/call", "GB/s", "err vs CPU"
    );
    for r in &rows {
        let err = r.max_rel_err.map_or("-".to_string(), |e| format!("{e:.1e}"));
        println!(
            "{:>width$} {:>11} {:>4} {:>10.2} {:>9.1} {:>12}",
            r.weight,
            format!("{}x{}", r.rows, r.cols),
            r.bits,
            r.us_per_call,
            r.gb_per_s,
            err
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "model": source, "device": device, "batch": args.batch, "copy_gb_per_s": copy, "rows": rows });
        cli::write_atomically(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}

/// Prefills every prompt in one step at every transformer's precision, then decodes greedily
/// `gen - 1` more steps, all sequences in the same steps: `together`, one `forward_batches` per
/// step; otherwise one `forward_batch` per precision after the other. Returns the seconds of
/// the prefill (which yields the first token) and of the decode steps.
fn decode(ts: &[&Transformer], prompts: &[Vec<u32>], gen: usize, together: bool) -> Result<(f64, f64)> {
    let mut caches: Vec<Vec<KvCache>> =
        ts.iter().map(|t| prompts.iter().map(|_| KvCache::new(t.config())).collect()).collect();
    let mut inputs: Vec<Vec<Vec<u32>>> = ts.iter().map(|_| prompts.to_vec()).collect();
    let step = |inputs: &mut Vec<Vec<Vec<u32>>>, caches: &mut Vec<Vec<KvCache>>| -> Result<()> {
        let mut steps: Vec<Vec<SequenceStep>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(toks, cs)| {
                toks.iter().zip(cs.iter_mut()).map(|(t, cache)| SequenceStep { tokens: t, cache }).collect()
            })
            .collect();
        let logits = if together {
            let mut batches: Vec<Batch> =
                ts.iter().zip(steps.iter_mut()).map(|(&transformer, steps)| Batch { transformer, steps }).collect();
            Transformer::forward_batches(&mut batches)?
        } else {
            ts.iter().zip(steps.iter_mut()).map(|(t, s)| t.forward_batch(s)).collect::<Result<Vec<_>>>()?
        };
        drop(steps);
        for (toks, l) in inputs.iter_mut().zip(&logits) {
            *toks = argmax_rows(l)?.into_iter().map(|id| vec![id]).collect();
        }
        Ok(())
    };
    let started = Instant::now();
    step(&mut inputs, &mut caches)?;
    let prefill = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 1..gen {
        step(&mut inputs, &mut caches)?;
    }
    Ok((prefill, started.elapsed().as_secs_f64()))
}

fn argmax_rows(logits: &candle_core::Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
}

/// The process's peak resident set (VmHWM), where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
