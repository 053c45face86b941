//! `drq-quantize`: Double Rounding PTQ of a model into one INT8 checkpoint that serves every
//! precision of its bit set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use kernels::{Granularity, TieRule};
use model::checkpoint::{CorrectionGranularity, WideRowsSpec};
use model::source::{self, ModelSource};
use quantize::gptq::{GptqSpec, InputMoments};
use quantize::hasb::allocate::quantization_errors;
use quantize::hasb::{hasb_profiles, AllocationSpec, ProfileRequest, TraceReport};
use quantize::profile::ProfileRules;
use quantize::recipe::PtqRecipe;
use quantize::train::data::{collect_files, TokenBlocks};
use quantize::{quantize_model, write_checkpoint, Grid, QuantSpec, QuantizedModel, SearchObjective};

#[derive(Parser)]
#[command(name = "drq-quantize", version, about = "Quantize a model into one INT8 Double Rounding checkpoint")]
struct Args {
    /// Model: hub repo id (owner/name[@rev]), Hugging Face directory, GGUF file, or `default`
    /// (SmolLM2-135M-Instruct).
    #[arg(short, long, default_value = "default")]
    model: String,
    /// PTQ recipe (TOML, see configs/ptq/); the flags below override it. Without one: every
    /// tool's default (group:128, group:32 for the embedding and lm_head, max-negative grid, bits
    /// 8,4,2).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bit-widths the scales are searched for (comma-separated, 2..8; 8 is always stored)
    /// [default: 8,4,2].
    #[arg(long, value_delimiter = ',')]
    bits: Option<Vec<u32>>,
    /// Scale granularity: `channel` (one scale per output row) or `group:N` (per N input columns)
    /// [default: group:128].
    #[arg(long)]
    granularity: Option<Granularity>,
    /// Another granularity for the weights whose name contains NAME, as NAME=GRANULARITY;
    /// repeatable. `embed_tokens=group:32`: the tied embedding (a fifth of SmolLM2's weights,
    /// its output layer too) gets 4× finer scales for +0.08 bits per weight.
    #[arg(long = "granularity-override", value_name = "NAME=GRANULARITY", value_parser = parse_granularity_override)]
    granularity_overrides: Vec<(String, Granularity)>,
    /// Tie rule of the second rounding: `even` (round half to even) or `up` (add-and-shift)
    /// [default: even].
    #[arg(long)]
    tie: Option<TieRule>,
    /// Scale search objective: `normalized` (each precision relative to its own best error)
    /// or `sum` (plain summed squared error, dominated by the lowest bit-width) [default: normalized].
    #[arg(long)]
    objective: Option<SearchObjective>,
    /// Grid: `symmetric` (positive scales) or `max-negative` (each group's largest-magnitude
    /// weight coded −128, so every precision has its extra negative level there, as llama.cpp's
    /// Q4_0 does) [default: max-negative].
    #[arg(long)]
    grid: Option<Grid>,
    /// Keep weights whose name contains one of these in float (e.g. `embed_tokens,lm_head`).
    #[arg(long, value_delimiter = ',')]
    keep_float: Option<Vec<String>>,
    /// Hessian-aware rounding of the codes (GPTQ adapted to Double Rounding): the bit-widths it
    /// optimises, in priority order. `8`: GPTQ at 8 bits, lower precisions are second roundings
    /// of its codes (SmolLM2 at group:128: W8 +0.10% over float instead of +0.44%). `4,8`:
    /// 4-bit levels by GPTQ, then the best 8-bit code within each (W4 closer to float in KL, W8
    /// much worse). Needs --calibration. Without it codes are rounded to nearest.
    #[arg(long)]
    gptq: Option<GptqSpec>,
    /// Per-precision corrections: for each of these bit-widths (below 8, e.g. `4,3,2`), one f16
    /// factor per output row or per scale group (--correction-granularity) that multiplies the
    /// scales that precision is served with, fitted to the layer's output over --calibration text
    /// (to the weight itself without it). The codes do not change and the kernels read corrected
    /// scales instead of the stored ones; bits per weight count 16 bits per factor.
    #[arg(long, value_delimiter = ',')]
    corrections: Option<Vec<u32>>,
    /// What one correction factor covers: `row` (16/cols bits per weight: +0.03 at 576 columns)
    /// or `group` (one per scale group: +0.125 at group:128, and more of the error removed).
    #[arg(long)]
    correction_granularity: Option<CorrectionGranularity>,
    /// Calibration text for --gptq (or a recipe's `gptq`) and --corrections: `.txt` files or
    /// directories of them (never WikiText-2).
    #[arg(long)]
    calibration: Vec<PathBuf>,
    /// Calibration blocks (sequences) drawn from the text.
    #[arg(long, default_value_t = 128)]
    calibration_blocks: usize,
    /// Tokens per calibration block.
    #[arg(long, default_value_t = 512)]
    calibration_seq: usize,
    /// GPTQ dampening: added to the input Hessian's diagonal as a fraction of its mean
    /// [default: 0.01].
    #[arg(long)]
    gptq_damp: Option<f64>,
    /// Seed of the calibration blocks' draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Per-layer precision profiles to store (TOML, see configs/profiles/); repeatable. Served
    /// and evaluated by name.
    #[arg(long)]
    profile: Vec<PathBuf>,
    /// HASB: store a Hessian-aware profile `hasb-B` for each of --budgets, from these traces of
    /// the model (`drq-hasb traces`; `drq-hasb allocate` does the same for any checkpoint, with
    /// floors, tied inputs and baselines).
    #[arg(long, requires = "budgets")]
    hasb: Option<PathBuf>,
    /// Budgets of --hasb in bits per weight as drq-eval counts them (scales and corrections
    /// included), e.g. `2.5,3,3.5,4,5`.
    #[arg(long, value_delimiter = ',', requires = "hasb")]
    budgets: Vec<f64>,
    /// The leading rows of the lm_head (the embedding when tied) served wider than the rest, as
    /// ROWS:+BITS, or `none`: a BPE vocabulary lists its frequent tokens first, and their rows
    /// carry most of what low precisions lose (SmolLM2: `4096:+1` takes W3 −23% and W4 −4% in
    /// perplexity for +0.017 bits per weight) [default: 4096:+1; with --config, the recipe's
    /// `wide_rows`, none when it has none].
    #[arg(long)]
    wide_rows: Option<WideRowsSpec>,
    /// Output checkpoint (`.safetensors`).
    #[arg(short, long)]
    out: PathBuf,
    /// Also write the per-layer reconstruction errors as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    force: bool,
}

fn main() {
    cli::run_main(|| run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    if args.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("--out must end in .safetensors (got {})", args.out.display());
    }
    if args.out.exists() && !args.force {
        bail!("{} exists; pass --force to overwrite it", args.out.display());
    }
    // Check where the outputs go before spending minutes quantizing.
    if args.out.is_dir() {
        bail!("--out {} is a directory", args.out.display());
    }
    cli::check_output_dir("--out", &args.out)?;
    if let Some(report) = &args.report {
        cli::check_output_dir("--report", report)?;
    }
    let recipe = match &args.config {
        Some(path) => PtqRecipe::load(path)?,
        None => PtqRecipe::default_recipe(),
    };
    let (mut spec, mut keep_float) = recipe.resolve()?;
    let wide_rows = match args.wide_rows {
        Some(w) => w,
        None => recipe.settings()?.wide_rows,
    };
    if let Some(bits) = args.bits.clone() {
        spec.bits = bits;
    }
    spec.granularity = args.granularity.unwrap_or(spec.granularity);
    spec.granularity_overrides.extend(args.granularity_overrides.iter().cloned());
    spec.tie = args.tie.unwrap_or(spec.tie);
    spec.objective = args.objective.unwrap_or(spec.objective);
    spec.grid = args.grid.unwrap_or(spec.grid);
    if let Some(k) = args.keep_float.clone() {
        keep_float = k;
    }
    spec.validate()?;
    let profiles = ProfileRules::load_all(&args.profile)?;
    let gptq = match args.gptq.clone().or(recipe.gptq()?) {
        Some(mut g) => {
            if let Some(b) = g.order.iter().find(|b| !spec.bits.contains(b) && **b != 8) {
                bail!("--gptq {b}: not in the bit set {:?} the scales are searched for", spec.bits);
            }
            if let Some(d) = args.gptq_damp {
                g.damp = d;
            }
            g.validate().context("--gptq-damp")?;
            if args.calibration.is_empty() {
                bail!("GPTQ rounding ({g}) needs calibration text: pass --calibration");
            }
            Some(g)
        }
        None => None,
    };
    let corrections = match args.corrections.clone().or(recipe.corrections.clone()) {
        Some(bits) => {
            for &b in &bits {
                kernels::check_bits(b).map_err(|e| anyhow::anyhow!("--corrections: {e}"))?;
                if b >= kernels::STORED_BITS {
                    bail!("--corrections {b}: the stored 8-bit codes need none (give bit-widths below 8)");
                }
            }
            bits
        }
        None => Vec::new(),
    };
    if corrections.is_empty() && args.correction_granularity.is_some() {
        bail!("--correction-granularity without --corrections (or a recipe's `corrections`)");
    }
    let granularity = match (args.correction_granularity, &recipe.correction_granularity) {
        (Some(g), _) => g,
        (None, Some(g)) => g.parse().context("recipe: correction_granularity")?,
        (None, None) => CorrectionGranularity::default(),
    };
    let calibration_files = if gptq.is_some() || !args.calibration.is_empty() {
        if args.calibration_seq < 2 || args.calibration_blocks == 0 {
            bail!("--calibration-seq must be at least 2 and --calibration-blocks at least 1");
        }
        collect_files(&args.calibration)?
    } else {
        Vec::new()
    };
    let traces = args.hasb.as_deref().map(TraceReport::load).transpose()?;
    let source: ModelSource = args.model.parse()?;
    let started = Instant::now();
    tracing::info!("loading {source}");
    let (float, provenance) = source::load_float(&source)?;
    if let Some(t) = &traces {
        t.ensure_model(&provenance.sha256, &source.to_string()).context("--hasb")?;
    }
    // The calibration text is read before any work, so a short one is refused at once.
    let calibration =
        if calibration_files.is_empty() { None } else { Some(calibration_blocks(&float, &calibration_files, &args)?) };
    let n_targets = quantize::model_ptq::quantizable(&float.config, &keep_float).len();
    let bar = cli::progress_bar(n_targets as u64, "quantizing");
    let mut quantized = quantize_model(&float, &spec, &keep_float, |name| {
        bar.set_prefix(name.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    quantized.quantization.widen_rows(&wide_rows, &float.config)?;
    let moments = match &calibration {
        Some(blocks) => Some(input_moments(&float, &quantized, blocks, &args)?),
        None => None,
    };
    if let (Some(g), Some(moments)) = (&gptq, &moments) {
        // GPTQ leaves a tied embedding (whose moments serve the corrections) to nearest rounding.
        let rounded = moments.keys().filter(|name| name.as_str() != model::weights::EMBED).count();
        let bar = cli::progress_bar(rounded as u64, "GPTQ");
        quantize::gptq::round_model(&float, &mut quantized, moments, g, &[], |name| {
            bar.set_prefix(name.to_string());
            bar.inc(1);
        })?;
        bar.finish_and_clear();
    }
    if !corrections.is_empty() {
        let bar = cli::progress_bar(quantized.quantized.len() as u64, "corrections");
        quantize::corrections::correct_model(
            &float,
            &mut quantized,
            &corrections,
            granularity,
            moments.as_ref(),
            |name| {
                bar.set_prefix(name.to_string());
                bar.inc(1);
            },
        )?;
        bar.finish_and_clear();
    }
    for p in &profiles {
        let bits = p.resolve(&quantized.quantization.quantized)?;
        quantized.quantization.add_profile(&p.name, bits)?;
    }
    if let Some(traces) = &traces {
        add_hasb_profiles(&float, &mut quantized, traces, &args.budgets)?;
    }
    write_checkpoint(&args.out, &float, &provenance, &quantized)?;

    print_report(&quantized.report, &spec.bits);
    if let Some(path) = &args.report {
        cli::write_atomically(path, serde_json::to_string_pretty(&quantized.report)?.as_bytes())?;
    }
    let size = std::fs::metadata(&args.out)?.len();
    tracing::info!(
        "wrote {} ({:.1} MB, {} quantized weights, {spec}, wide rows {wide_rows}) in {:.1}s",
        args.out.display(),
        size as f64 / 1e6,
        quantized.quantized.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A HASB profile per budget, over every bit-width the stored codes serve.
fn add_hasb_profiles(
    float: &model::FloatModel,
    q: &mut QuantizedModel,
    traces: &TraceReport,
    budgets: &[f64],
) -> Result<()> {
    let spec = AllocationSpec::default();
    let request =
        ProfileRequest { budgets: budgets.to_vec(), prefix: "hasb".into(), trace_free: false, random: 0, seed: 0 };
    let tie = q.quantization.tie()?;
    let errors = quantization_errors(
        &q.quantization.quantized,
        |name| q.quantized.get(name).cloned().with_context(|| format!("`{name}` is not quantized")),
        tie,
        &float.weights,
        &spec.bits,
    )?;
    let (_, profiles) = hasb_profiles(&q.quantization, &float.config, &errors, traces, &spec, &request)?;
    for p in profiles {
        tracing::info!("profile {}: {:.4} bits per weight", p.name, p.allocation.mean_bits);
        q.quantization.add_profile(&p.name, p.allocation.bits)?;
    }
    Ok(())
}

/// `--calibration-blocks` blocks of `--calibration-seq` tokens drawn (seeded) from the calibration text.
fn calibration_blocks(float: &model::FloatModel, files: &[PathBuf], args: &Args) -> Result<Vec<Vec<u32>>> {
    let eos = float.config.eos_token_ids.first().copied();
    let data =
        TokenBlocks::from_files(&float.tokenizer, files, eos, args.calibration_seq - 1, 0).context("--calibration")?;
    if data.train.len() < args.calibration_blocks {
        bail!(
            "--calibration holds {} blocks of {} tokens; --calibration-blocks asks for {}",
            data.train.len(),
            args.calibration_seq,
            args.calibration_blocks
        );
    }
    Ok(data.batch(args.seed, 0, args.calibration_blocks).into_iter().map(<[u32]>::to_vec).collect())
}

/// The second moments of every quantized linear layer's inputs over the calibration blocks.
fn input_moments(
    float: &model::FloatModel,
    q: &QuantizedModel,
    blocks: &[Vec<u32>],
    args: &Args,
) -> Result<HashMap<String, InputMoments>> {
    let started = Instant::now();
    let blocks: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
    let bar = cli::progress_bar(blocks.len() as u64, "calibrating");
    let moments = quantize::gptq::collect_moments(
        &float.config,
        &float.weights,
        &q.quantization.quantized,
        &blocks,
        8,
        |done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    tracing::info!(
        "input moments of {} weights from {} tokens in {:.1}s",
        moments.len(),
        blocks.len() * args.calibration_seq,
        started.elapsed().as_secs_f64()
    );
    Ok(moments)
}

/// One line per quantized weight, then the parameter-weighted mean.
fn print_report(report: &[quantize::LayerReport], bits: &[u32]) {
    let header: String = bits.iter().map(|b| format!("{:>12}", format!("W{b} rel.err"))).collect();
    println!("{:<48} {:>12}{header}", "weight", "shape");
    let mut weighted = vec![0f64; bits.len()];
    let mut total = 0f64;
    for layer in report {
        let errs: String = layer.relative_error.iter().map(|(_, e)| format!("{e:>12.3e}")).collect();
        println!("{:<48} {:>12}{errs}", layer.name, format!("{}x{}", layer.rows, layer.cols));
        let n = (layer.rows * layer.cols) as f64;
        total += n;
        for (acc, (_, e)) in weighted.iter_mut().zip(&layer.relative_error) {
            *acc += e * n;
        }
    }
    let means: String = weighted.iter().map(|w| format!("{:>12.3e}", w / total.max(1.0))).collect();
    println!("{:<48} {:>12}{means}", "mean (weighted by size)", "");
    let rounded: Vec<_> = report.iter().filter_map(|l| l.output_error.as_ref()).collect();
    if !rounded.is_empty() {
        println!(
            "\noutput error over the calibration inputs, tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), mean over {} GPTQ-rounded weights:",
            rounded.len()
        );
        for (i, b) in bits.iter().enumerate() {
            let mean = |f: fn(&quantize::OutputError) -> &Vec<(u32, f64)>| {
                rounded.iter().map(|e| f(e)[i].1).sum::<f64>() / rounded.len() as f64
            };
            let (nearest, gptq) = (mean(|e| &e.nearest), mean(|e| &e.gptq));
            println!("  W{b}: nearest {nearest:.3e}, GPTQ {gptq:.3e} ({:+.1}%)", 100.0 * (gptq / nearest - 1.0));
        }
    }
}

fn parse_granularity_override(text: &str) -> Result<(String, Granularity), String> {
    QuantSpec::parse_override(text).map_err(|e| e.to_string())
}
