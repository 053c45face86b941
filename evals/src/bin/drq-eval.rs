//! `drq-eval`: offline evaluation of a model at several precisions through the serving runtime.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use cli::plot::{document, panel, Mark, Panel, Series, COLORS};
use cli::Activations;
use evals::perplexity::{evaluate, windows, Candidate, PrecisionReport, Protocol, Window};
use kernels::{Granularity, KernelConfig, TieRule};
use model::checkpoint::{Checkpoint, WideRowsSpec};
use model::source::{self, FloatModel, ModelSource};
use model::transformer::cuda::{CudaTransformer, GpuResident};
use model::{precision, KvCache, ModelConfig, OpsMode, Precision, ResidentModel, Transformer};
use quantize::profile::ProfileRules;
use quantize::recipe::{PtqRecipe, PtqSettings};
use quantize::SearchObjective;
use tokenizers::Tokenizer;

#[derive(Parser)]
#[command(name = "drq-eval", version, about = "Evaluate a model at several precisions")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity, KL divergence and top-1 agreement with the float model, per precision.
    Perplexity(PerplexityArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// llama.cpp's: non-overlapping windows, BOS first when the model uses one, second half scored.
    Llama,
    /// Windows every --stride tokens; every token after the first scored once.
    Strided,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuntimeArg {
    /// The bit-plane kernels over one resident copy of the checkpoint (what is served).
    Kernels,
    /// Every precision decoded to f32 weights and multiplied by candle (the reference path).
    Reference,
}

#[derive(clap::Args)]
struct PerplexityArgs {
    /// Model: a drq checkpoint, or a float source (hub repo id, Hugging Face directory, GGUF file,
    /// `default`), which is then quantized in memory for the integer precisions. Repeat to
    /// evaluate several checkpoints of one model in one pass.
    #[arg(short, long, default_values = ["default"])]
    model: Vec<String>,
    /// Float model for `fp` and as the baseline of KL and top-1 agreement when --model is a
    /// checkpoint.
    #[arg(long)]
    reference: Option<String>,
    /// Precisions to evaluate, comma-separated: `fp`, bit-widths 2..8, and names of per-layer
    /// profiles (stored in the checkpoint or given with --profile).
    #[arg(short, long, default_value = "fp,8,4,2")]
    precision: String,
    /// Per-layer profile (TOML, see configs/profiles/) to evaluate by its name, added in memory
    /// to every checkpoint evaluated (the files are not changed); repeatable.
    #[arg(long)]
    profile: Vec<PathBuf>,
    /// The leading lm_head rows served wider, ROWS:+BITS or `none` (see drq-quantize --help),
    /// instead of what each checkpoint stores (in memory; the files are not changed) and of the
    /// in-memory quantization's recipe.
    #[arg(long)]
    wide_rows: Option<WideRowsSpec>,
    /// Text file to score (UTF-8), e.g. WikiText-2's wiki.test.raw.
    #[arg(short, long)]
    file: PathBuf,
    /// Context length (tokens per window).
    #[arg(short, long, default_value_t = 512)]
    ctx: usize,
    #[arg(long, value_enum, default_value = "llama")]
    protocol: ProtocolArg,
    /// Window step for `--protocol strided` (default: half the context).
    #[arg(long)]
    stride: Option<usize>,
    /// Only use the first N tokens of the text.
    #[arg(long)]
    limit_tokens: Option<usize>,
    /// Only evaluate the first N windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Plot perplexity against bits per weight (SVG): a line per checkpoint through its
    /// precisions, the float model as a dashed line.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Other tools' results on the same text and context, drawn on the plot as labelled points
    /// (JSON: `text`, `ctx`, `points: [{label, bits_per_weight, perplexity: {WINDOWS: value}}]`;
    /// e.g. docs/results/llamacpp-smollm2-wikitext2.json, llama.cpp's files of the shared model).
    #[arg(long, requires = "plot")]
    reference_points: Option<PathBuf>,
    /// In-memory quantization of a float --model: a PTQ recipe (TOML, see configs/ptq/; no
    /// GPTQ: that needs calibration text) [default: every tool's default, as drq-quantize's].
    #[arg(long)]
    config: Option<PathBuf>,
    /// In-memory quantization of a float --model: bit set of the scale search (overrides the
    /// recipe).
    #[arg(long, value_delimiter = ',')]
    bits: Option<Vec<u32>>,
    /// In-memory quantization of a float --model: `channel` or `group:N` (overrides the recipe).
    #[arg(long)]
    granularity: Option<Granularity>,
    /// In-memory quantization of a float --model: tie rule, `even` or `up` (overrides the recipe).
    #[arg(long)]
    tie: Option<TieRule>,
    /// In-memory quantization of a float --model: scale search objective (overrides the recipe).
    #[arg(long)]
    objective: Option<SearchObjective>,
    /// How checkpoint precisions run (`fp` always runs on candle).
    #[arg(long, value_enum, default_value = "kernels")]
    runtime: RuntimeArg,
    /// Where the checkpoint precisions run: `cpu`, `cuda` or `cuda:N`. With the kernels runtime a
    /// GPU runs our CUDA kernels (f32 activations; needs only the NVIDIA driver) and `fp` stays on
    /// the CPU; with the reference runtime, candle's CUDA backend runs everything (a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Activations of the kernels (--runtime kernels).
    #[arg(long, value_enum, default_value = "auto")]
    activations: Activations,
    /// Kernel threads (--runtime kernels). Default: 1 and 2 are timed on a few windows and the
    /// faster is used (logged, and recorded in --json).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() {
    cli::run_main(|| match Cli::parse().command {
        Command::Perplexity(args) => perplexity(args),
    });
}

/// `drq-eval perplexity`, step by step: check the flags, load the models, cut the text into
/// windows, build one runtime per (checkpoint, precision), score every window through all of
/// them in lockstep, then print and write the results.
fn perplexity(args: PerplexityArgs) -> Result<()> {
    let plan = Plan::from_args(&args)?;
    let models = Models::load(&args, &plan)?;
    let wins = score_windows(&args, &plan, &models)?;
    let marks = reference_marks(&args, wins.len())?;
    let runs = Runs::build(&args, &plan, &models, &wins)?;
    let (reports, seconds) = run_windows(&plan, &models, &runs, &wins)?;
    print_table(&reports, wins.len());
    let forward_tokens = wins.iter().map(|w| w.tokens.len() - 1).sum::<usize>() * runs.models.len();
    println!(
        "{} windows, {} tokens scored per model, {seconds:.1}s ({:.0} tokens/s through the model)",
        wins.len(),
        reports[0].tokens_scored,
        forward_tokens as f64 / seconds
    );
    write_outputs(&args, &plan, &models, &runs, &reports, (wins.len(), marks), seconds)
}

/// `--reference-points`: results of other tools on the same text, context and windows.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferencePoints {
    /// File name of the text they were measured on (e.g. `wiki.test.raw`).
    text: String,
    ctx: usize,
    /// Where the numbers come from.
    #[serde(default)]
    source: String,
    points: Vec<ReferencePoint>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferencePoint {
    label: String,
    bits_per_weight: f64,
    /// Perplexity by number of windows scored (`"20"`, `"595"`, …).
    perplexity: BTreeMap<String, f64>,
}

/// The `--reference-points` of this run's text, context and window count, as plot marks;
/// refused (before the evaluation) when the file has no results for them.
fn reference_marks(args: &PerplexityArgs, windows: usize) -> Result<Vec<Mark>> {
    let Some(path) = &args.reference_points else { return Ok(Vec::new()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let refs: ReferencePoints =
        serde_json::from_str(&text).with_context(|| format!("{}: not a reference-points file", path.display()))?;
    let file = args.file.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned());
    ensure!(
        refs.text == file && refs.ctx == args.ctx,
        "{}: measured on {} at ctx {}, this run scores {file} at ctx {}",
        path.display(),
        refs.text,
        refs.ctx,
        args.ctx
    );
    let key = windows.to_string();
    let mut marks = Vec::new();
    for p in &refs.points {
        let Some(&perplexity) = p.perplexity.get(&key) else {
            let known: Vec<&str> = p.perplexity.keys().map(String::as_str).collect();
            bail!(
                "{}: `{}` has no result for {windows} windows (it has: {})",
                path.display(),
                p.label,
                known.join(", ")
            );
        };
        marks.push(Mark { x: p.bits_per_weight, y: perplexity, label: p.label.clone() });
    }
    if !refs.source.is_empty() {
        tracing::info!("reference points: {}", refs.source);
    }
    Ok(marks)
}

/// What the flags ask for, checked before anything is loaded.
struct Plan {
    /// `fp` among the precisions.
    wants_float: bool,
    /// The checkpoint precisions (bit-widths and profiles), in the order given.
    int_precisions: Vec<Precision>,
    protocol: Protocol,
    text: String,
    profiles: Vec<ProfileRules>,
    device: candle_core::Device,
    /// `--runtime kernels --device cuda[:N]`: the GPU the checkpoint precisions run on.
    gpu: Option<usize>,
}

impl Plan {
    fn from_args(args: &PerplexityArgs) -> Result<Self> {
        let precisions = precision::parse_list(&args.precision)?;
        if args.max_windows == Some(0) {
            bail!("--max-windows must be at least 1 (0 windows would score nothing)");
        }
        if args.runtime == RuntimeArg::Reference {
            ensure!(args.threads.is_none(), "--threads applies to --runtime kernels only");
            ensure!(args.activations != Activations::Int8, "--activations int8 needs --runtime kernels");
        }
        ensure!(args.threads != Some(0), "--threads must be at least 1");
        // The reference runtime runs on candle's device; the kernels on the CPU or on our GPU
        // kernels (`fp` then stays on the CPU).
        let (device, gpu) = match args.runtime {
            RuntimeArg::Reference => (cli::parse_device(&args.device)?, None),
            RuntimeArg::Kernels => (candle_core::Device::Cpu, cli::gpu_ordinal(&args.device)?),
        };
        if gpu.is_some() {
            ensure!(args.activations != Activations::Int8, "--device cuda: the GPU kernels take f32 activations");
            ensure!(args.threads.is_none(), "--threads applies to the CPU kernels");
        }
        let text =
            std::fs::read(&args.file).with_context(|| format!("cannot read text file {}", args.file.display()))?;
        let text = String::from_utf8(text).with_context(|| format!("{} is not UTF-8 text", args.file.display()))?;
        let protocol = match args.protocol {
            ProtocolArg::Llama => Protocol::LlamaCpp,
            ProtocolArg::Strided => Protocol::Strided { stride: args.stride.unwrap_or((args.ctx / 2).max(1)) },
        };
        let profiles = ProfileRules::load_all(&args.profile)?;
        for (flag, path) in [("--json", &args.json), ("--plot", &args.plot)] {
            if let Some(path) = path {
                cli::check_output_dir(flag, path)?;
            }
        }
        Ok(Self {
            wants_float: precisions.contains(&Precision::Float),
            int_precisions: precisions.into_iter().filter(|p| *p != Precision::Float).collect(),
            protocol,
            text,
            profiles,
            device,
            gpu,
        })
    }
}

/// At most one float model (for `fp` and as the KL baseline) and any number of checkpoints of the
/// same model, with the tokenizer they share.
struct Models {
    float: Option<FloatModel>,
    checkpoints: Vec<Checkpoint>,
    config: ModelConfig,
    tokenizer: Tokenizer,
    add_bos: bool,
    /// The checkpoint file of an in-memory quantization, removed when the evaluation ends.
    _temporary: Option<tempfile::NamedTempFile>,
}

impl Models {
    fn load(args: &PerplexityArgs, plan: &Plan) -> Result<Self> {
        let mut float: Option<FloatModel> = None;
        let mut checkpoints: Vec<Checkpoint> = Vec::new();
        let mut temporary = None;
        for spec in args.model.iter().chain(&args.reference) {
            match spec.parse::<ModelSource>()? {
                ModelSource::Checkpoint(path) => checkpoints.push(Checkpoint::open(&path)?),
                source if float.is_none() => {
                    let (model, provenance) = source::load_float(&source)?;
                    if checkpoints.is_empty() && !plan.int_precisions.is_empty() && args.model.len() == 1 {
                        // A float model alone: quantize it, through a real checkpoint file so that
                        // what is measured is exactly what is served.
                        let settings = in_memory_settings(args)?;
                        tracing::info!("quantizing in memory ({settings})");
                        let q = quantize::model_ptq::quantize_with(&model, &settings, |_| {})?;
                        let tmp = tempfile::Builder::new().prefix("drq-eval-").suffix(".safetensors").tempfile()?;
                        quantize::write_checkpoint(tmp.path(), &model, &provenance, &q)?;
                        checkpoints.push(Checkpoint::open(tmp.path())?);
                        temporary = Some(tmp);
                    }
                    float = Some(model);
                }
                source => bail!("{source}: only one float model can be evaluated at a time"),
            }
        }
        if plan.wants_float && float.is_none() {
            bail!("`fp` needs a float model: a checkpoint stores no float weights (add --reference SRC)");
        }
        if !plan.int_precisions.is_empty() && checkpoints.is_empty() {
            bail!("integer precisions need a checkpoint or a float model to quantize");
        }
        for c in &mut checkpoints {
            if let Some(w) = &args.wide_rows {
                c.widen_rows(w)?;
            }
            for p in &plan.profiles {
                let bits = p.resolve(&c.quantization().quantized)?;
                c.add_profile(&p.name, bits)?;
            }
        }
        let config = match (&float, checkpoints.first()) {
            (_, Some(c)) => c.config().clone(),
            (Some(f), None) => f.config.clone(),
            (None, None) => bail!("no model given"),
        };
        for c in &checkpoints {
            if *c.config() != config || float.as_ref().is_some_and(|f| f.config != config) {
                bail!("{}: not the same model as the others (configs differ)", c.path().display());
            }
        }
        let (tokenizer, add_bos) = match (&float, checkpoints.first()) {
            (Some(f), _) => (f.tokenizer.clone(), f.add_bos),
            (None, Some(c)) => (c.tokenizer()?, c.add_bos()),
            (None, None) => unreachable!("checked above"),
        };
        Ok(Self { float, checkpoints, config, tokenizer, add_bos, _temporary: temporary })
    }

    /// Each checkpoint's file name, to tell several apart.
    fn names(&self) -> Vec<String> {
        let stem = |c: &Checkpoint| c.path().file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        self.checkpoints.iter().map(stem).collect()
    }
}

/// The PTQ settings of an in-memory quantization: `--config` or the default recipe, overridden
/// by `--bits`, `--granularity`, `--tie`, `--objective`.
fn in_memory_settings(args: &PerplexityArgs) -> Result<PtqSettings> {
    let recipe = match &args.config {
        Some(path) => PtqRecipe::load(path)?,
        None => PtqRecipe::default_recipe(),
    };
    if let Some(g) = recipe.gptq()? {
        bail!(
            "--config asks for {g} rounding, which needs calibration text: make a checkpoint with drq-quantize --gptq"
        );
    }
    let mut settings = recipe.settings()?;
    let spec = &mut settings.spec;
    if let Some(bits) = &args.bits {
        spec.bits = bits.clone();
    }
    spec.granularity = args.granularity.unwrap_or(spec.granularity);
    spec.tie = args.tie.unwrap_or(spec.tie);
    spec.objective = args.objective.unwrap_or(spec.objective);
    spec.validate()?;
    settings.wide_rows = args.wide_rows.unwrap_or(settings.wide_rows);
    Ok(settings)
}

/// The text tokenized and cut into windows by the protocol.
fn score_windows(args: &PerplexityArgs, plan: &Plan, models: &Models) -> Result<Vec<Window>> {
    let encoding =
        models.tokenizer.encode(plan.text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let mut tokens = encoding.get_ids().to_vec();
    if let Some(limit) = args.limit_tokens {
        tokens.truncate(limit);
    }
    let bos = if models.add_bos { models.config.bos_token_id } else { None };
    let mut wins = windows(&tokens, args.ctx, plan.protocol, bos)?;
    if let Some(max) = args.max_windows {
        wins.truncate(max);
    }
    tracing::info!(
        "{} tokens, {} windows of up to {} tokens, precisions {}",
        tokens.len(),
        wins.len(),
        args.ctx,
        args.precision
    );
    Ok(wins)
}

/// One runtime per row of the results: `fp` first, then each checkpoint at each precision.
struct Runs {
    models: Vec<(String, Transformer)>,
    /// Beside each model, the same on a GPU (`--runtime kernels --device cuda`).
    gpu: Vec<Option<CudaTransformer>>,
    /// (checkpoint index, bits per weight) of each checkpoint precision, in the order their models
    /// follow `fp`.
    storage_bits: Vec<(usize, f64)>,
    /// How the checkpoint precisions ran (for --json).
    runtime_info: serde_json::Value,
}

impl Runs {
    fn build(args: &PerplexityArgs, plan: &Plan, models: &Models, wins: &[Window]) -> Result<Self> {
        let (checkpoints, config, device) = (&models.checkpoints, &models.config, &plan.device);
        let mut runs = Vec::new();
        let mut gpu = Vec::new();
        if let (Some(f), true) = (&models.float, plan.wants_float) {
            runs.push((
                "fp".to_string(),
                Transformer::new(&f.config, &f.weights.to_device(device)?, OpsMode::Inference)?,
            ));
        }
        let label = |c: &Checkpoint, p: &Precision| {
            // Several checkpoints: name each row by its file, which tells apart checkpoints of one
            // granularity (e.g. differently trained ones).
            match c.path().file_stem() {
                Some(stem) if checkpoints.len() > 1 => format!("{p} {}", stem.to_string_lossy()),
                _ => p.to_string(),
            }
        };
        let mut storage_bits = Vec::new();
        for (i, c) in checkpoints.iter().enumerate() {
            for p in &plan.int_precisions {
                storage_bits.push((i, c.bits_per_weight(p)?));
            }
        }
        let runtime_info = match args.runtime {
            RuntimeArg::Reference => {
                for c in checkpoints {
                    for p in &plan.int_precisions {
                        let weights = c.weights_at(p)?.to_device(device)?;
                        runs.push((label(c, p), Transformer::new(config, &weights, OpsMode::Inference)?));
                    }
                }
                serde_json::json!({ "runtime": "reference", "device": args.device })
            }
            RuntimeArg::Kernels => {
                let mut kernel = KernelConfig { path: args.activations.path(), ..KernelConfig::default() };
                // One resident copy per checkpoint serves all its precisions.
                let started = Instant::now();
                let residents = if plan.int_precisions.is_empty() {
                    Vec::new()
                } else {
                    checkpoints.iter().map(ResidentModel::from_checkpoint).collect::<Result<Vec<_>>>()?
                };
                let bytes: usize = residents.iter().map(ResidentModel::resident_bytes).sum();
                tracing::info!(
                    "resident weights built in {:.1}s ({:.1} MiB)",
                    started.elapsed().as_secs_f64(),
                    bytes as f64 / (1 << 20) as f64
                );
                let (threads, timing) = match (args.threads, residents.first(), plan.int_precisions.first()) {
                    (Some(t), _, _) => (t, None),
                    (None, _, _) if plan.gpu.is_some() => (1, None),
                    (None, Some(r), Some(p)) => {
                        let (t, timing) = pick_threads(r, p, kernel, wins)?;
                        (t, Some(timing))
                    }
                    (None, _, _) => (1, None),
                };
                kernel.threads = threads;
                tracing::info!(
                    "kernels: backend {}, {} activations, {threads} thread(s){}",
                    kernel.backend,
                    args.activations.name(),
                    if args.threads.is_some() { "" } else { " (timed)" }
                );
                for (c, r) in checkpoints.iter().zip(&residents) {
                    for p in &plan.int_precisions {
                        runs.push((label(c, p), Transformer::from_resident(r, p, &kernel)?));
                    }
                }
                if let Some(ordinal) = plan.gpu {
                    let rt = std::sync::Arc::new(kernels::cuda::CudaRuntime::new(ordinal)?);
                    tracing::info!("GPU {ordinal}: {} (f32 activations)", rt.device_name());
                    // One upload per checkpoint serves all its precisions; `fp` stays on the CPU.
                    let mut uploads: Vec<GpuResident> =
                        checkpoints.iter().map(|_| GpuResident::new(rt.clone())).collect();
                    let first_stored = runs.len() - checkpoints.len() * plan.int_precisions.len();
                    gpu.resize_with(first_stored, || None);
                    for (k, (_, t)) in runs.iter().enumerate().skip(first_stored) {
                        let ci = (k - first_stored) / plan.int_precisions.len();
                        gpu.push(Some(t.to_cuda(&mut uploads[ci])?));
                    }
                }
                serde_json::json!({
                    "runtime": "kernels",
                    "device": args.device,
                    "backend": kernel.backend.name(),
                    "activations": args.activations.name(),
                    "threads": threads,
                    "threads_timing_seconds": timing,
                    "resident_bytes": bytes,
                })
            }
        };
        gpu.resize_with(runs.len(), || None);
        Ok(Self { models: runs, gpu, storage_bits, runtime_info })
    }
}

/// Every window through every runtime (the float logits computed once per window), with a
/// progress bar; returns a report per runtime, bits per weight filled in, and the seconds taken.
fn run_windows(plan: &Plan, models: &Models, runs: &Runs, wins: &[Window]) -> Result<(Vec<PrecisionReport>, f64)> {
    let candidates: Vec<Candidate> = runs
        .models
        .iter()
        .zip(&runs.gpu)
        .map(|((label, m), g)| Candidate { label: label.clone(), model: m, gpu: g.as_ref() })
        .collect();
    let reference = (models.float.is_some() && plan.wants_float).then_some(0);
    let started = Instant::now();
    let bar = cli::progress_bar(wins.len() as u64, "perplexity");
    // The bar is hidden when stderr is not a terminal; log progress then, for long batch runs.
    let log_every =
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) { usize::MAX } else { (wins.len() / 20).max(1) };
    let mut reports = evaluate(&candidates, reference, wins, |done| {
        bar.set_position(done as u64);
        if done % log_every == 0 {
            tracing::info!("{done}/{} windows, {:.0}s", wins.len(), started.elapsed().as_secs_f64());
        }
    })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    // The checkpoint precisions' reports are the last ones, in `storage_bits`' order.
    let first_stored = reports.len() - runs.storage_bits.len();
    for (r, &(_, bits)) in reports[first_stored..].iter_mut().zip(&runs.storage_bits) {
        r.bits_per_weight = Some(bits);
    }
    Ok((reports, seconds))
}

/// `--plot` and `--json`.
fn write_outputs(
    args: &PerplexityArgs,
    plan: &Plan,
    models: &Models,
    runs: &Runs,
    reports: &[PrecisionReport],
    (windows, marks): (usize, Vec<Mark>),
    seconds: f64,
) -> Result<()> {
    if let Some(path) = &args.plot {
        let file = args.file.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        let title = format!("{file}, ctx {}, {windows} windows", args.ctx);
        let svg = plot_perplexity_vs_bits(reports, &runs.storage_bits, &models.names(), marks, &title);
        cli::write_atomically(path, svg.as_bytes())?;
    }
    if let Some(path) = &args.json {
        let checkpoints: Vec<_> = models
            .checkpoints
            .iter()
            .map(|c| serde_json::json!({ "path": c.path(), "quantization": c.quantization() }))
            .collect();
        let protocol = match plan.protocol {
            Protocol::LlamaCpp => "llama".to_string(),
            Protocol::Strided { stride } => format!("strided:{stride}"),
        };
        let json = serde_json::json!({
            "model": args.model,
            "reference": args.reference,
            "file": args.file,
            "ctx": args.ctx,
            "protocol": protocol,
            "windows": windows,
            "checkpoints": checkpoints,
            "runtime": runs.runtime_info,
            "seconds": seconds,
            "results": reports,
        });
        cli::write_atomically(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}

/// Kernel threads for this machine: 1 and 2 timed on the first (up to) three windows, cut to
/// 128 tokens (two 64-row kernel calls per weight), in the order 1, 2, 2, 1, 1, 2 so that a drift
/// in machine load hits both alike. Returns the faster count and the seconds of each.
fn pick_threads(
    resident: &ResidentModel,
    precision: &Precision,
    kernel: KernelConfig,
    wins: &[Window],
) -> Result<(usize, serde_json::Value)> {
    let cores = cli::cores();
    if cores < 2 {
        return Ok((1, serde_json::json!({ "cores": cores })));
    }
    let models: Vec<Transformer> = [1, 2]
        .iter()
        .map(|&threads| Transformer::from_resident(resident, precision, &KernelConfig { threads, ..kernel }))
        .collect::<Result<_>>()?;
    let mut seconds = [0f64; 2];
    for (i, w) in wins.iter().take(3).enumerate() {
        let n = w.tokens.len().min(128);
        let input = candle_core::Tensor::new(&w.tokens[..n], &candle_core::Device::Cpu)?.unsqueeze(0)?;
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for m in order {
            let started = Instant::now();
            models[m].forward(&input, &mut KvCache::new(models[m].config()), n / 2)?;
            seconds[m] += started.elapsed().as_secs_f64();
        }
    }
    let threads = if seconds[1] < seconds[0] { 2 } else { 1 };
    tracing::info!("kernel threads timed: 1 thread {:.2}s, 2 threads {:.2}s → {threads}", seconds[0], seconds[1]);
    Ok((threads, serde_json::json!({ "1": seconds[0], "2": seconds[1] })))
}

/// Perplexity (log scale) against bits per weight: a line per checkpoint through its bit-widths
/// in order of size, and one per family of its profiles (the name before the first `-`:
/// `hasb-3.0` and `hasb-4.0` are one line, `random-3.0-s1` another), each point labelled with its
/// precision; the float model's perplexity as a dashed line, other tools' results as grey marks.
fn plot_perplexity_vs_bits(
    reports: &[PrecisionReport],
    storage_bits: &[(usize, f64)],
    names: &[String],
    marks: Vec<Mark>,
    title: &str,
) -> String {
    let stored = &reports[reports.len() - storage_bits.len()..];
    // (checkpoint, family) → its labelled (bits per weight, perplexity) points.
    type Line = ((usize, String), Vec<((f64, f64), String)>);
    let mut lines: Vec<Line> = Vec::new();
    for (r, &(checkpoint, bits)) in stored.iter().zip(storage_bits) {
        // The precision: the label's first word (the checkpoint's name follows).
        let precision = r.label.split_whitespace().next().unwrap_or_default().to_string();
        let family = match precision.parse::<u32>() {
            Ok(_) => String::new(),
            Err(_) => precision.split('-').next().unwrap_or_default().to_string(),
        };
        let key = (checkpoint, family);
        let point = ((bits, r.perplexity), precision);
        match lines.iter_mut().find(|(k, _)| *k == key) {
            Some((_, points)) => points.push(point),
            None => lines.push((key, vec![point])),
        }
    }
    let series: Vec<Series> = lines
        .into_iter()
        .enumerate()
        .map(|(i, ((checkpoint, family), mut labelled))| {
            labelled.sort_by(|a, b| a.0 .0.total_cmp(&b.0 .0));
            let (points, point_labels) = labelled.into_iter().unzip();
            let label =
                if family.is_empty() { names[checkpoint].clone() } else { format!("{} {family}", names[checkpoint]) };
            Series { label, color: COLORS[i % COLORS.len()], points, point_labels }
        })
        .collect();
    let reference = reports.iter().find(|r| r.label == "fp").map(|r| (r.perplexity, format!("fp {:.3}", r.perplexity)));
    let axes = Panel {
        title: "perplexity (log scale)",
        x_label: "bits per weight (f16 scales included)",
        log_y: true,
        reference,
        marks,
    };
    document(720.0, 460.0, title, |svg| panel(svg, (70.0, 50.0, 600.0, 350.0), &axes, &series))
}

fn print_table(reports: &[PrecisionReport], windows: usize) {
    println!(
        "{:>16} {:>7} {:>12} {:>9} {:>10} {:>10} {:>8} {:>9}",
        "precision", "bits/w", "perplexity", "± s.e.", "tokens", "KL(fp‖·)", "top-1", "s/window"
    );
    for r in reports {
        let kl = r.mean_kl.map_or("-".to_string(), |k| format!("{k:.5}"));
        let top1 = r.top1_agreement.map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0));
        let bits = r.bits_per_weight.map_or("-".to_string(), |b| format!("{b:.2}"));
        println!(
            "{:>16} {:>7} {:>12.4} {:>9.4} {:>10} {:>10} {:>8} {:>9.3}",
            r.label,
            bits,
            r.perplexity,
            r.perplexity_stderr,
            r.tokens_scored,
            kl,
            top1,
            r.seconds / windows.max(1) as f64
        );
    }
}
