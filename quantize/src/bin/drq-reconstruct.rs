//! `drq-reconstruct`: block-wise reconstruction of a float model into one INT8 Double Rounding
//! checkpoint (`quantize::blockwise`): one transformer block at a time, its latent weights,
//! scales and norms trained so that its output at every bit-width of the set matches the float
//! block's on calibration text. A run directory keeps every trained block; `--resume` continues
//! after the last one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use clap::Parser;
use kernels::Granularity;
use model::checkpoint::{CorrectionGranularity, WideRowsSpec};
use model::source::{self, ModelSource};
use quantize::blockwise::{self, reconstruct, BlockInputs, BlockLoss, BlockwiseConfig, Reconstruction, Stage};
use quantize::model_ptq::write_checkpoint_as;
use quantize::profile::ProfileRules;
use quantize::train::data::{collect_files, TokenBlocks};
use quantize::train::AlrsPolicy;

#[derive(Parser, Clone)]
#[command(
    name = "drq-reconstruct",
    version,
    about = "Block-wise reconstruction of every precision into one INT8 Double Rounding checkpoint",
    after_help = "Recipe fields (configs/blockwise/*.toml) are overridden by the flags of the same name.\n\
                  Example:\n  drq-reconstruct --model default --config configs/blockwise/w842.toml \\\n    \
                  --data ../shared/data/austen --run-dir runs/blockwise --out blockwise.safetensors"
)]
struct Args {
    /// Model: hub repo id (owner/name[@rev]), Hugging Face directory, GGUF file, or `default`.
    #[arg(short, long, default_value = "default")]
    model: String,
    /// Reconstruction recipe (TOML, see configs/blockwise/); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Calibration text: files, or directories whose *.txt files are read (never WikiText-2).
    #[arg(long, required = true, value_delimiter = ',')]
    data: Vec<PathBuf>,
    /// Run directory: the recipe, every trained block and its report.
    #[arg(long)]
    run_dir: PathBuf,
    /// Output checkpoint (`.safetensors`).
    #[arg(short, long)]
    out: PathBuf,
    /// Continue the run in --run-dir after its last trained block (its recipe; no recipe flags).
    #[arg(long)]
    resume: bool,
    /// Start over in a run directory that already holds blocks, and overwrite --out.
    #[arg(long)]
    force: bool,
    /// Per-layer precision profiles to store in --out (TOML, see configs/profiles/); repeatable.
    #[arg(long)]
    profile: Vec<PathBuf>,
    /// Also write the per-weight reconstruction errors as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where the blocks and the lm_head train: `cpu`, `cuda` or `cuda:N` (a GPU needs a build
    /// with `--features cuda`; the optimizer steps, the corrections and the checkpoint stay on
    /// the host). Not part of the recipe: a resumed run may change it.
    #[arg(long, default_value = "cpu")]
    device: String,

    /// Bit-widths reconstructed jointly [recipe default: 8,4,2].
    #[arg(long, value_delimiter = ',', help_heading = "Recipe")]
    bits: Option<Vec<u32>>,
    /// Loss weight of each bit-width, in the order of --bits [default: 0.1 for 8 and 2 bits, 1 for the others].
    #[arg(long, value_delimiter = ',', help_heading = "Recipe")]
    bit_weights: Option<Vec<f64>>,
    /// Initial scales: `channel` or `group:N` [default: group:128].
    #[arg(long, help_heading = "Recipe")]
    granularity: Option<String>,
    /// Another initial granularity for the weights whose name contains NAME, as
    /// NAME=GRANULARITY (e.g. `embed_tokens=group:32`); repeatable.
    #[arg(
        long = "granularity-override",
        value_name = "NAME=GRANULARITY",
        value_parser = parse_granularity_override,
        help_heading = "Recipe"
    )]
    granularity_overrides: Vec<(String, Granularity)>,
    /// Second-rounding tie rule: `even` or `up`.
    #[arg(long, help_heading = "Recipe")]
    tie: Option<String>,
    /// Initial scale search objective: `normalized` or `sum`.
    #[arg(long, help_heading = "Recipe")]
    objective: Option<String>,
    /// Grid: `symmetric` or `max-negative` (see drq-quantize --help).
    #[arg(long, help_heading = "Recipe")]
    grid: Option<String>,
    /// Keep weights whose name contains one of these in float.
    #[arg(long, value_delimiter = ',', help_heading = "Recipe")]
    keep_float: Option<Vec<String>>,
    /// Calibration sequences.
    #[arg(long, help_heading = "Recipe")]
    samples: Option<usize>,
    /// Tokens per calibration sequence.
    #[arg(long, help_heading = "Recipe")]
    seq_len: Option<usize>,
    /// Passes over the calibration sequences per block.
    #[arg(long, help_heading = "Recipe")]
    epochs: Option<usize>,
    /// Sequences per mini-batch.
    #[arg(long, help_heading = "Recipe")]
    batch: Option<usize>,
    /// Peak move of a latent weight per update, in units of its group's 8-bit step.
    #[arg(long, help_heading = "Recipe")]
    weight_lr: Option<f64>,
    /// Peak move of a scale per update, relative to the scale.
    #[arg(long, help_heading = "Recipe")]
    scale_lr: Option<f64>,
    /// Peak move of a norm gain or bias per update (0: frozen).
    #[arg(long, help_heading = "Recipe")]
    norm_lr: Option<f64>,
    /// Weighting of each precision's scale gradients: `none` or `eta`.
    #[arg(long, help_heading = "Recipe")]
    alrs: Option<AlrsPolicy>,
    /// Inputs of each block: `quantized` (the blocks before at the same precision) or `float`.
    #[arg(long, help_heading = "Recipe")]
    inputs: Option<BlockInputs>,
    /// Block output error: `token-relative` (each position relative to its float output's
    /// energy) or `mse` (dominated by the attention-sink positions).
    #[arg(long, help_heading = "Recipe")]
    loss: Option<BlockLoss>,
    /// After training, move each 8-bit code nearest the float weight within every lower
    /// precision's trained level (`true`/`false`).
    #[arg(long, help_heading = "Recipe")]
    refit_8bit: Option<bool>,
    /// After the blocks, re-round the 8-bit codes by GPTQ towards each layer's float output on
    /// the calibration sequences, within every lower trained precision's level (`true`/`false`).
    #[arg(long, help_heading = "Recipe")]
    gptq_8bit: Option<bool>,
    /// Passes over the calibration sequences training the lm_head (a tied embedding in its
    /// lm_head role: KL to the float model's next-token distribution) before the blocks; 0: PTQ.
    #[arg(long, help_heading = "Recipe")]
    head_epochs: Option<usize>,
    /// Sequences per mini-batch of the lm_head stage [recipe default: --batch].
    #[arg(long, help_heading = "Recipe")]
    head_batch: Option<usize>,
    /// Per-precision corrections fitted after the reconstruction (bit-widths below 8) to each
    /// layer's output on the calibration sequences.
    #[arg(long, value_delimiter = ',', help_heading = "Recipe")]
    corrections: Option<Vec<u32>>,
    /// What one correction factor covers: `row` or `group` (one per scale group).
    #[arg(long, help_heading = "Recipe")]
    correction_granularity: Option<CorrectionGranularity>,
    /// The leading lm_head rows served wider, ROWS:+BITS or `none` (see drq-quantize --help)
    /// [recipe default: 4096:+1].
    #[arg(long, help_heading = "Recipe")]
    wide_rows: Option<WideRowsSpec>,
    /// Seed of the calibration draw and of the mini-batch order.
    #[arg(long, help_heading = "Recipe")]
    seed: Option<u64>,
}

impl Args {
    /// Applies the recipe flags to `cfg`; returns whether any was given.
    fn apply(&self, cfg: &mut BlockwiseConfig) -> bool {
        let mut any = false;
        macro_rules! set {
            ($($field:ident),* $(,)?) => {$(
                if let Some(v) = &self.$field {
                    cfg.$field = v.clone();
                    any = true;
                }
            )*};
        }
        for (pattern, g) in &self.granularity_overrides {
            cfg.granularity_overrides.insert(pattern.clone(), g.to_string());
            any = true;
        }
        if let Some(b) = self.head_batch {
            cfg.head_batch = Some(b);
            any = true;
        }
        set!(
            bits,
            bit_weights,
            granularity,
            tie,
            objective,
            grid,
            keep_float,
            samples,
            seq_len,
            epochs,
            batch,
            weight_lr,
            scale_lr,
            norm_lr,
            alrs,
            inputs,
            loss,
            refit_8bit,
            gptq_8bit,
            head_epochs,
            corrections,
            correction_granularity,
            wide_rows,
            seed,
        );
        any
    }
}

const RECIPE: &str = "recipe.toml";
const SOURCE: &str = "source.json";

fn main() {
    cli::run_main(|| run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    check_out(&args)?;
    let profiles = ProfileRules::load_all(&args.profile)?;
    if let Some(report) = &args.report {
        cli::check_output_dir("--report", report)?;
    }
    let cfg = recipe(&args)?;
    let device = cli::parse_device(&args.device)?;
    let files = collect_files(&args.data)?;
    let source: ModelSource = args.model.parse()?;
    if matches!(source, ModelSource::Checkpoint(_)) {
        bail!("--model {}: reconstruction starts from a float model, not a checkpoint", args.model);
    }
    tracing::info!("loading {source}");
    let (mut float, provenance) = source::load_float(&source)?;
    let samples = calibration(&float, &files, &cfg)?;
    prepare_run_dir(&args, &cfg, &provenance.sha256, &samples)?;

    let blocks = float.config.num_hidden_layers;
    let per_block = cfg.steps_per_block();
    let head = blockwise::head_weight(&float.config, &cfg.keep_float).filter(|_| cfg.head_epochs > 0);
    let head_steps = if head.is_some() { cfg.head_steps() } else { 0 };
    let bar = cli::progress_bar((head_steps + blocks * per_block) as u64, "");
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut progress = |stage: Stage, step: usize| {
        let (name, offset, steps) = match stage {
            Stage::Head => ("lm_head".to_string(), 0, head_steps),
            Stage::Block(b) => (format!("block {}/{blocks}", b + 1), head_steps + b * per_block, per_block),
        };
        bar.set_message(name.clone());
        bar.set_position((offset + step) as u64);
        if !terminal && step.is_multiple_of((steps / 4).max(1)) {
            tracing::info!("{name}: step {step}/{steps}");
        }
    };
    if let Some(name) = &head {
        tracing::info!("training the lm_head ({name}) first: {} epochs, {head_steps} mini-batches", cfg.head_epochs);
    }
    tracing::info!(
        "reconstructing {blocks} blocks: {} sequences of {} tokens, {} epochs of {per_block} mini-batches each, bits {:?}",
        cfg.samples,
        cfg.seq_len,
        cfg.epochs,
        cfg.bits
    );
    float.weights = float.weights.to_device(&device)?;
    let (mut q, reports) = reconstruct(&float, &cfg, &samples, &args.run_dir, &device, &mut progress)?;
    float.weights = float.weights.to_device(&Device::Cpu)?;
    bar.finish_and_clear();
    if cfg.gptq_8bit || !cfg.corrections.is_empty() {
        let sequences: Vec<&[u32]> = samples.iter().map(Vec::as_slice).collect();
        let moments = quantize::gptq::collect_moments(
            &float.config,
            &float.weights,
            &q.quantization.quantized,
            &sequences,
            cfg.batch,
            |_| {},
        )?;
        if cfg.gptq_8bit {
            tracing::info!("re-rounding the 8-bit codes by GPTQ within the levels of bits {:?}", cfg.bits);
            let spec = quantize::gptq::GptqSpec::new(vec![kernels::STORED_BITS])?;
            quantize::gptq::round_model(&float, &mut q, &moments, &spec, &cfg.bits, |_| {})?;
        }
        let granularity = cfg.correction_granularity;
        quantize::corrections::correct_model(&float, &mut q, &cfg.corrections, granularity, Some(&moments), |_| {})?;
    }
    q.quantization.widen_rows(&cfg.wide_rows, &float.config)?;
    for p in &profiles {
        let bits = p.resolve(&q.quantization.quantized)?;
        q.quantization.add_profile(&p.name, bits)?;
    }
    write_checkpoint_as(&args.out, &float, &provenance, &q, "drq-reconstruct")?;
    if let Some(path) = &args.report {
        cli::write_atomically(path, serde_json::to_string_pretty(&q.report)?.as_bytes())?;
    }
    print_summary(&reports, &q.report, &cfg.bits);
    tracing::info!(
        "wrote {} in {:.1}s (run directory {})",
        args.out.display(),
        started.elapsed().as_secs_f64(),
        args.run_dir.display()
    );
    Ok(())
}

/// `--out`: a new `.safetensors` file (or `--force`) in an existing directory.
fn check_out(args: &Args) -> Result<()> {
    if args.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("--out must end in .safetensors (got {})", args.out.display());
    }
    if args.out.exists() && !args.force {
        bail!("{} exists; pass --force to overwrite it", args.out.display());
    }
    cli::check_output_dir("--out", &args.out)
}

/// The recipe: the saved one on `--resume` (no flag may change it), else `--config` (or the
/// default) with the flags applied, validated.
fn recipe(args: &Args) -> Result<BlockwiseConfig> {
    let saved = args.run_dir.join(RECIPE);
    let cfg = if args.resume {
        ensure!(saved.is_file(), "--resume: {} holds no run ({RECIPE})", args.run_dir.display());
        // The GPTQ re-rounding, the corrections and the wide rows come after the blocks, so a
        // finished run can be resumed to change them; every other recipe setting is the saved one.
        let blocks_only =
            Args { gptq_8bit: None, corrections: None, correction_granularity: None, wide_rows: None, ..args.clone() };
        if args.config.is_some() || blocks_only.apply(&mut BlockwiseConfig::default()) {
            bail!(
                "--resume continues the saved recipe ({}); --config and recipe flags other than \
                 --gptq-8bit, --corrections, --correction-granularity and --wide-rows cannot change it",
                saved.display()
            );
        }
        let mut cfg = BlockwiseConfig::load(&saved)?;
        if let Some(on) = args.gptq_8bit {
            cfg.gptq_8bit = on;
        }
        if let Some(bits) = &args.corrections {
            cfg.corrections = bits.clone();
        }
        if let Some(g) = args.correction_granularity {
            cfg.correction_granularity = g;
        }
        if let Some(w) = args.wide_rows {
            cfg.wide_rows = w;
        }
        cfg
    } else {
        let mut cfg = match &args.config {
            Some(p) => BlockwiseConfig::load(p)?,
            None => BlockwiseConfig::default(),
        };
        args.apply(&mut cfg);
        cfg
    };
    cfg.validate()?;
    Ok(cfg)
}

/// `samples` calibration sequences of `seq_len` tokens, drawn (seeded) from the text.
fn calibration(float: &model::FloatModel, files: &[PathBuf], cfg: &BlockwiseConfig) -> Result<Vec<Vec<u32>>> {
    let eos = float.config.eos_token_ids.first().copied();
    let data = TokenBlocks::from_files(&float.tokenizer, files, eos, cfg.seq_len - 1, 0).context("--data")?;
    ensure!(
        data.train.len() >= cfg.samples,
        "--data holds {} sequences of {} tokens; the recipe asks for {}",
        data.train.len(),
        cfg.seq_len,
        cfg.samples
    );
    Ok(data.batch(cfg.seed, 0, cfg.samples).into_iter().map(<[u32]>::to_vec).collect())
}

/// What a run directory's blocks were trained from: a resumed run must match it.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct RunSource {
    source_sha256: String,
    /// FNV-1a of the calibration tokens.
    calibration: u64,
}

/// Sets up the run directory: a new run needs an empty one (or `--force`, which removes its
/// blocks); a resumed one must hold blocks of the same model and calibration.
fn prepare_run_dir(args: &Args, cfg: &BlockwiseConfig, sha256: &str, samples: &[Vec<u32>]) -> Result<()> {
    let dir = &args.run_dir;
    let source = RunSource { source_sha256: sha256.to_string(), calibration: fingerprint(samples) };
    let source_path = dir.join(SOURCE);
    if args.resume {
        let text =
            std::fs::read_to_string(&source_path).with_context(|| format!("cannot read {}", source_path.display()))?;
        let saved: RunSource =
            serde_json::from_str(&text).with_context(|| format!("{} is invalid", source_path.display()))?;
        ensure!(saved == source, "--resume: {} was trained from another model or calibration text", dir.display());
        return Ok(());
    }
    let blocks = trained_blocks(dir)?;
    if !blocks.is_empty() {
        ensure!(
            args.force,
            "{} already holds {} trained blocks: continue with --resume, or start over with --force",
            dir.display(),
            blocks.len()
        );
        for b in blocks {
            std::fs::remove_file(&b).with_context(|| format!("cannot remove {}", b.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    cli::write_atomically(&dir.join(RECIPE), toml::to_string(cfg)?.as_bytes())?;
    cli::write_atomically(&source_path, serde_json::to_string_pretty(&source)?.as_bytes())
}

/// The block files (`block-NNN.*`) in `dir`.
fn trained_blocks(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("block-") || n.starts_with("head."))
        {
            out.push(path);
        }
    }
    Ok(out)
}

fn fingerprint(samples: &[Vec<u32>]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in samples.iter().flatten().flat_map(|id| id.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The lm_head's KL before → after, per block the output MSE before → after at each
/// bit-width; then the weights' mean relative error (parameter-weighted) at each bit-width.
fn print_summary(reports: &Reconstruction, layers: &[quantize::LayerReport], bits: &[u32]) {
    if let Some(h) = &reports.head {
        let cells: Vec<String> =
            bits.iter().map(|b| format!("W{b} {:.4} → {:.4}", h.kl_before[b], h.kl_after[b])).collect();
        println!("lm_head ({}) KL to the float model: {}", h.weight, cells.join(", "));
    }
    let blocks = &reports.blocks;
    println!(
        "{:>6} {}",
        "block",
        bits.iter().map(|b| format!("{:>24}", format!("W{b} MSE before → after"))).collect::<String>()
    );
    for r in blocks {
        let cells: String = bits
            .iter()
            .map(|b| format!("{:>24}", format!("{:.3e} → {:.3e}", r.mse_before[b], r.mse_after[b])))
            .collect();
        println!("{:>6} {cells}", r.block);
    }
    let total: f64 = layers.iter().map(|l| (l.rows * l.cols) as f64).sum();
    let means: Vec<String> = bits
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mean = layers.iter().map(|l| l.relative_error[i].1 * (l.rows * l.cols) as f64).sum::<f64>() / total;
            format!("W{b} {mean:.3e}")
        })
        .collect();
    println!("mean relative weight error: {}", means.join(", "));
}

fn parse_granularity_override(text: &str) -> Result<(String, Granularity), String> {
    quantize::QuantSpec::parse_override(text).map_err(|e| e.to_string())
}
