//! `drq-hasb`: Hessian-aware mixed precision. `traces` estimates the loss Hessian's trace of
//! every matrix of a float model on calibration text; `allocate` turns traces and a checkpoint's
//! quantization errors into a bit-width per matrix for each budget, stored as named profiles.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use cli::plot::{document, panel, Mark, Panel, Series, COLORS};
use model::checkpoint::Checkpoint;
use model::source::{self, ModelSource};
use quantize::hasb::allocate::parse_floor;
use quantize::hasb::{
    checkpoint_errors, hasb_profiles, AllocationSpec, NamedAllocation, Problem, ProfileRequest, TraceConfig,
    TraceReport, Weighting,
};
use quantize::profile::ProfileRules;
use quantize::train::data::{collect_files, TokenBlocks};

#[derive(Parser)]
#[command(name = "drq-hasb", version, about = "Hessian-aware mixed precision: per-layer traces and bit allocations")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Estimate Tr(H) of the calibration loss for every matrix of a float model (Hutchinson).
    Traces(TracesArgs),
    /// Allocate a bit-width per matrix of a checkpoint for each budget; store them as profiles.
    Allocate(AllocateArgs),
}

#[derive(ClapArgs)]
struct TracesArgs {
    /// Model: hub repo id (owner/name[@rev]), Hugging Face directory, GGUF file, or `default`.
    #[arg(short, long, default_value = "default")]
    model: String,
    /// Calibration text: `.txt` files or directories of them (never WikiText-2).
    #[arg(long, required = true, value_delimiter = ',')]
    calibration: Vec<PathBuf>,
    /// Tokens per calibration block.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Blocks per probe (each probe draws its own).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Probes taken before the tolerance is checked.
    #[arg(long, default_value_t = 8)]
    min_probes: usize,
    /// Probes at most.
    #[arg(long, default_value_t = 100)]
    max_probes: usize,
    /// Stop when every matrix's standard error of Tr(H)/n is at most this fraction of it (or of
    /// the model's mean Tr(H)/n, where that is larger).
    #[arg(long, default_value_t = 0.1)]
    tolerance: f64,
    /// Finite-difference step of the Hessian-vector products, relative to each matrix's RMS.
    #[arg(long, default_value_t = 1e-3)]
    epsilon: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu`, `cuda` or `cuda:N` (a GPU needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output: the traces as JSON.
    #[arg(short, long)]
    out: PathBuf,
    /// Also plot Tr(H)/n per matrix, by block and kind (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(ClapArgs)]
struct AllocateArgs {
    /// The checkpoint to allocate for (its stored codes give each matrix's error at each bit-width).
    checkpoint: PathBuf,
    /// Traces from `drq-hasb traces` on the checkpoint's float model.
    #[arg(long)]
    traces: PathBuf,
    /// Budgets: bits per weight as drq-eval counts them (scales and corrections included), or
    /// the mean bits per matrix with `--weighting matrices`.
    #[arg(long, required = true, value_delimiter = ',')]
    budgets: Vec<f64>,
    /// The float model the checkpoint was made from [default: its recorded source].
    #[arg(short, long)]
    model: Option<String>,
    /// Bit-widths a matrix may take.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,7,8")]
    bits: Vec<u32>,
    /// Least bits for the matrices whose name contains PATTERN (`PATTERN=BITS`, repeatable),
    /// e.g. `embed_tokens=6`.
    #[arg(long, value_parser = parse_floor)]
    floor: Vec<(String, u32)>,
    /// One bit-width for the projections reading the same input (q/k/v, gate/up).
    #[arg(long)]
    tie_inputs: bool,
    /// What a budget averages: `parameters` (bits per weight) or `matrices` (mean bit-width).
    #[arg(long, default_value = "parameters")]
    weighting: Weighting,
    /// Profile names are PREFIX-BUDGET (e.g. hasb-3.0).
    #[arg(long, default_value = "hasb")]
    prefix: String,
    /// Also store baselines at each budget for comparison: `tracefree-B` (the same solver with
    /// every matrix equally sensitive per weight) and N random allocations `random-B-sK`.
    #[arg(long, default_value_t = 0)]
    random: usize,
    #[arg(long)]
    trace_free: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write each profile as a TOML file (as in configs/profiles/) into this directory (created if missing).
    #[arg(long)]
    profiles_dir: Option<PathBuf>,
    /// Write the checkpoint with its new profiles here [default: over the input, atomically].
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Replace profiles of the same names that the checkpoint already holds.
    #[arg(long)]
    replace: bool,
}

fn main() {
    cli::run_main(|| match Args::parse().command {
        Command::Traces(args) => traces(args),
        Command::Allocate(args) => allocate(args),
    });
}

fn traces(args: TracesArgs) -> Result<()> {
    cli::check_output_dir("--out", &args.out)?;
    if let Some(plot) = &args.plot {
        cli::check_output_dir("--plot", plot)?;
    }
    ensure!(args.seq_len >= 2, "--seq-len must be at least 2");
    let cfg = TraceConfig {
        min_probes: args.min_probes,
        max_probes: args.max_probes,
        tolerance: args.tolerance,
        epsilon: args.epsilon,
        batch: args.batch,
        seed: args.seed,
    };
    cfg.validate()?;
    let files = collect_files(&args.calibration)?;
    let device = cli::parse_device(&args.device)?;
    let source: ModelSource = args.model.parse()?;
    tracing::info!("loading {source}");
    let (float, provenance) = source::load_float(&source)?;
    let eos = float.config.eos_token_ids.first().copied();
    let data = TokenBlocks::from_files(&float.tokenizer, &files, eos, args.seq_len, 0).context("--calibration")?;
    ensure!(
        data.train.len() >= args.batch,
        "--calibration holds {} blocks of {} tokens, fewer than --batch {}",
        data.train.len(),
        args.seq_len + 1,
        args.batch
    );
    let names: Vec<String> =
        quantize::model_ptq::quantizable(&float.config, &[]).into_iter().map(|(name, ..)| name).collect();
    tracing::info!(
        "Hutchinson traces of {} matrices: {}..{} probes of {} tokens, tolerance {}",
        names.len(),
        cfg.min_probes,
        cfg.max_probes,
        cfg.batch * args.seq_len,
        cfg.tolerance
    );
    let bar = cli::progress_bar(cfg.max_probes as u64, "probes");
    let report =
        quantize::hasb::traces::trace_report(&float, &provenance, &names, &data, &cfg, &device, |n, worst| {
            bar.set_position(n as u64);
            bar.set_prefix(format!("worst relative error {worst:.3}"));
            if n % 10 == 0 {
                tracing::info!("{n} probes: worst relative standard error {worst:.3} (stops at {})", cfg.tolerance);
            }
        })?;
    bar.finish_and_clear();
    cli::write_atomically(&args.out, serde_json::to_string_pretty(&report)?.as_bytes())?;
    print_traces(&report);
    if let Some(path) = &args.plot {
        cli::write_atomically(path, plot_traces(&report).as_bytes())?;
    }
    tracing::info!(
        "{} probes ({}) in {:.0}s; wrote {}",
        report.probes,
        if report.converged { "converged" } else { "stopped at --max-probes" },
        report.seconds,
        args.out.display()
    );
    Ok(())
}

fn print_traces(report: &TraceReport) {
    println!("{:<48} {:>11} {:>12} {:>8} {:>12}", "matrix", "weights", "Tr(H)", "±rel", "Tr(H)/n");
    for l in &report.layers {
        println!(
            "{:<48} {:>11} {:>12.4e} {:>8.3} {:>12.4e}",
            l.name,
            l.params,
            l.trace,
            l.trace_se / l.trace.abs(),
            l.per_weight
        );
    }
}

/// Tr(H)/n (log scale) against the block index, a line per kind of matrix; matrices outside the
/// blocks (the embedding) as marks at block −1.
fn plot_traces(report: &TraceReport) -> String {
    let mut kinds: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut marks = Vec::new();
    for l in &report.layers {
        let block = l.name.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.'));
        match block.and_then(|(i, kind)| Some((i.parse::<f64>().ok()?, kind))) {
            Some((i, kind)) => {
                let kind = kind.trim_end_matches(".weight").rsplit('.').next().unwrap_or(kind);
                kinds.entry(kind.to_string()).or_default().push((i, l.per_weight.abs()));
            }
            None => marks.push(Mark { x: -1.0, y: l.per_weight.abs(), label: l.name.clone() }),
        }
    }
    let series: Vec<Series> = kinds
        .into_iter()
        .enumerate()
        .map(|(i, (label, points))| Series {
            label,
            color: COLORS[i % COLORS.len()],
            point_labels: vec![String::new(); points.len()],
            points,
        })
        .collect();
    let axes = Panel { title: "Tr(H)/n per weight (log scale)", x_label: "block", log_y: true, reference: None, marks };
    let title = format!("Hessian traces, {} ({} probes)", report.source, report.probes);
    document(720.0, 460.0, &title, |svg| panel(svg, (70.0, 50.0, 600.0, 350.0), &axes, &series))
}

fn allocate(args: AllocateArgs) -> Result<()> {
    let started = Instant::now();
    let out = args.out.clone().unwrap_or_else(|| args.checkpoint.clone());
    ensure!(
        out.extension().and_then(|e| e.to_str()) == Some("safetensors"),
        "--out must end in .safetensors (got {})",
        out.display()
    );
    cli::check_output_dir("--out", &out)?;
    if let Some(dir) = &args.profiles_dir {
        // Created before the long work, so a path that cannot be one fails first.
        std::fs::create_dir_all(dir).with_context(|| format!("--profiles-dir {}", dir.display()))?;
    }
    let mut ckpt = Checkpoint::open(&args.checkpoint)?;
    let traces = TraceReport::load(&args.traces)?;
    let recorded = ckpt.provenance().clone();
    traces
        .ensure_model(&recorded.source_sha256, &format!("{}'s model {}", args.checkpoint.display(), recorded.source))
        .with_context(|| format!("--traces {}", args.traces.display()))?;
    let source: ModelSource = args.model.as_deref().unwrap_or(&recorded.source).parse()?;
    tracing::info!("loading {source}");
    let (float, provenance) = source::load_float(&source)?;
    ensure!(
        provenance.sha256 == recorded.source_sha256,
        "{source} has sha256 {}, but {} was made from a model with sha256 {}",
        provenance.sha256,
        args.checkpoint.display(),
        recorded.source_sha256
    );
    ensure!(ckpt.config() == &float.config, "{} is a checkpoint of another model", args.checkpoint.display());

    let spec = AllocationSpec {
        bits: args.bits.clone(),
        weighting: args.weighting,
        floors: args.floor.clone(),
        tie_inputs: args.tie_inputs,
    };
    let request = ProfileRequest {
        budgets: args.budgets.clone(),
        prefix: args.prefix.clone(),
        trace_free: args.trace_free,
        random: args.random,
        seed: args.seed,
    };
    tracing::info!("quantization errors of {} matrices at bits {:?}", ckpt.quantization().quantized.len(), spec.bits);
    let errors = checkpoint_errors(&ckpt, &float.weights, &spec.bits)?;
    let meta = ckpt.quantization().clone();
    let (hasb, profiles) = hasb_profiles(&meta, &float.config, &errors, &traces, &spec, &request)?;
    for p in &profiles {
        if ckpt.quantization().profiles.contains_key(&p.name) {
            ensure!(
                args.replace,
                "{} already holds a profile `{}` (pass --replace)",
                args.checkpoint.display(),
                p.name
            );
            ckpt.remove_profile(&p.name);
        }
        ckpt.add_profile(&p.name, p.allocation.bits.clone())?;
    }
    print_allocations(&profiles, &hasb, &spec);
    for p in &profiles {
        let counted = ckpt.bits_per_weight(&model::Precision::Profile(p.name.clone()))?;
        if spec.weighting == Weighting::Parameters && (counted - p.allocation.mean_bits).abs() > 1e-9 {
            bail!("profile `{}`: {counted} bits per weight counted, {} allocated", p.name, p.allocation.mean_bits);
        }
    }
    if let Some(dir) = &args.profiles_dir {
        write_profile_files(dir, &profiles, &args.traces)?;
    }
    ckpt.save_as(&out)?;
    tracing::info!(
        "wrote {} profiles into {} in {:.1}s",
        profiles.len(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Each profile as a `configs/profiles/` TOML file in `dir`.
fn write_profile_files(dir: &std::path::Path, profiles: &[NamedAllocation], traces: &std::path::Path) -> Result<()> {
    for p in profiles {
        let description = format!("{}, traces {}", p.description, traces.display());
        let toml = ProfileRules::explicit(&p.name, &description, &p.allocation.bits).to_toml()?;
        cli::write_atomically(&dir.join(format!("{}.toml", p.name)), toml.as_bytes())?;
    }
    Ok(())
}

/// A line per profile: its mean bits, its objective under the traces, and the share of weights
/// at each bit-width.
fn print_allocations(profiles: &[NamedAllocation], hasb: &Problem, spec: &AllocationSpec) {
    let weights: BTreeMap<&str, u64> =
        hasb.items().iter().flat_map(|i| i.names.iter().map(String::as_str).zip(i.weights.iter().copied())).collect();
    let all: u64 = weights.values().sum();
    let header: String = spec.bits.iter().map(|b| format!("{:>6}", format!("{b}b"))).collect();
    println!("{:<22} {:>10} {:>12} {header}", "profile", "mean bits", "Σ s·‖ΔW‖²");
    for p in profiles {
        let shares: String = spec
            .bits
            .iter()
            .map(|&b| {
                let at: u64 = p.allocation.bits.iter().filter(|(_, &x)| x == b).map(|(n, _)| weights[n.as_str()]).sum();
                format!("{:>5.1}%", 100.0 * at as f64 / all.max(1) as f64)
            })
            .collect();
        println!("{:<22} {:>10.4} {:>12.4e} {shares}", p.name, p.allocation.mean_bits, hasb.objective(&p.allocation));
    }
}
