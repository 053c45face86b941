//! `drq-synth`: distillation text sampled from a model, for `drq-train --data` (LLM-QAT's
//! data-free recipe: start from a random token, let the model write).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cli::Activations;
use kernels::KernelConfig;
use model::Precision;
use serve::engine::{Engine, EngineOptions};
use serve::metrics::Metrics;
use serve::synth::{synthesize, SynthOptions};

#[derive(Parser)]
#[command(
    name = "drq-synth",
    version,
    about = "Sample training text from a model (for distillation in drq-train)",
    long_about = "Sample training text from a model, for drq-train --data. Each sequence starts from a token \
                  drawn uniformly from the vocabulary and continues by sampling the model (LLM-QAT's data-free \
                  distillation data). Sequences are written in order, separated by a blank line; the output \
                  depends only on the model, precision, sampling flags and --seed, not on --max-batch or --threads."
)]
struct Args {
    /// Model: a drq checkpoint, or any source (hub repo id, Hugging Face directory, GGUF file,
    /// `default` = SmolLM2-135M-Instruct), which is then quantized first and cached.
    #[arg(short, long, default_value = "default")]
    model: String,
    /// PTQ recipe (TOML, see configs/ptq/) when --model is not a checkpoint [default: group:128, bits 8,4,2].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Precision to sample at (2..8 or a profile of the checkpoint); 8 is closest to the float model.
    #[arg(long, default_value = "8")]
    precision: String,
    /// Sequences to sample.
    #[arg(long, default_value_t = 1000)]
    sequences: usize,
    /// Tokens generated per sequence at most (fewer when the model ends it).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature (0 is greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus mass in (0, 1]; 1 samples from the whole distribution.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the start tokens; sequence i samples with seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences decoded together in one step.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Kernel threads (default: every core).
    #[arg(long, default_value_t = cli::cores())]
    threads: usize,
    /// Activations of the kernels (see drq-serve --help).
    #[arg(long, value_enum, default_value = "auto")]
    activations: Activations,
    /// Output text file (written to a temporary name, then renamed).
    #[arg(short, long)]
    out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    force: bool,
}

fn main() {
    cli::run_main(|| run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    let precision: Precision = args.precision.parse().with_context(|| format!("--precision {}", args.precision))?;
    let options = SynthOptions {
        sequences: args.sequences,
        max_tokens: args.max_tokens,
        precision,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    options.validate()?;
    cli::check_output_dir("--out", &args.out)?;
    if args.out.exists() && !args.force {
        bail!("{} exists; pass --force to overwrite it", args.out.display());
    }
    let settings = serve::load::ptq_settings(args.config.as_deref())?;
    let checkpoint = serve::load::open_or_quantize(&args.model, &settings, &model::source::pypi::drq_cache_dir()?)?;
    let model_ctx = checkpoint.config().max_position_embeddings;
    if args.max_tokens + 16 > model_ctx {
        bail!("--max-tokens {}: the model's context is {model_ctx} tokens, start tokens included", args.max_tokens);
    }
    let engine_options = EngineOptions {
        max_batch: args.max_batch,
        max_queue: args.max_batch,
        max_context: (args.max_tokens + 16).min(model_ctx),
        kernel: KernelConfig { threads: args.threads, path: args.activations.path(), ..KernelConfig::default() },
        ..EngineOptions::default()
    };
    let engine = Engine::start(&checkpoint, engine_options, Arc::new(Metrics::new()))?;
    drop(checkpoint);
    if !engine.info().precisions.contains(&options.precision) {
        bail!("--precision {}: the checkpoint serves {}", args.precision, engine.info().precision_names().join(", "));
    }

    let bar = cli::progress_bar(args.sequences as u64, "sampling");
    let generated = AtomicUsize::new(0);
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report_every = (args.sequences as u64).div_ceil(10);
    let sequences = runtime.block_on(synthesize(&engine, &options, |s| {
        let total = generated.fetch_add(s.tokens, Ordering::Relaxed) + s.tokens;
        let progress = format!("{total} tokens, {:.0} tok/s", total as f64 / started.elapsed().as_secs_f64());
        bar.inc(1);
        // The bar is hidden when stderr is not a terminal: a log line every tenth of the run.
        if bar.is_hidden() && bar.position().is_multiple_of(report_every) {
            tracing::info!("{}/{} sequences, {progress}", bar.position(), args.sequences);
        }
        bar.set_prefix(progress);
    }))?;
    bar.finish_and_clear();

    let text: String = sequences.iter().map(|s| format!("{}\n\n", s.text.trim())).collect();
    cli::write_atomically(&args.out, text.as_bytes())?;
    let tokens: usize = sequences.iter().map(|s| s.tokens).sum();
    let ended_early = sequences.iter().filter(|s| s.tokens < args.max_tokens).count();
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        "wrote {} sequences, {tokens} generated tokens ({ended_early} ended before --max-tokens) in {seconds:.0} s ({:.0} tok/s) to {}",
        sequences.len(),
        tokens as f64 / seconds,
        args.out.display()
    );
    Ok(())
}
