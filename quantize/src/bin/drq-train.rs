//! `drq-train`: joint W8/W4/W2 fine-tuning with ALRS (METHOD.md §2) of a float model into one
//! INT8 Double Rounding checkpoint. A run directory holds the training state (saved every
//! `save_every` steps, at the end, and on Ctrl-C), the resolved recipe, `log.jsonl` and
//! `plot.svg`; `--resume` continues a run exactly as if it had not stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use cli::write_atomically;
use model::checkpoint::{Checkpoint, WideRowsSpec};
use model::source::{self, ModelSource};
use quantize::model_ptq::write_checkpoint_as;
use quantize::profile::ProfileRules;
use quantize::train::log::{self as runlog, Record};
use quantize::train::{
    data, AlrsPolicy, LoopMode, ScaleMoments, Teacher, TokenBlocks, TrainConfig, Trainable, Trainer,
};

#[derive(Parser)]
#[command(
    name = "drq-train",
    version,
    about = "Joint W8/W4/W2 fine-tuning with ALRS into one INT8 Double Rounding checkpoint",
    after_help = "Recipe fields (configs/train/*.toml) are overridden by the flags of the same name.\n\
                  Ctrl-C saves the training state and exits (status 130); --resume continues it.\n\
                  Example:\n  drq-train --model default --config configs/train/w842-eta.toml \\\n    \
                  --data ../shared/data/austen --run-dir runs/eta --out eta.safetensors"
)]
struct Args {
    /// Model: hub repo id (owner/name[@rev]), Hugging Face directory, GGUF file, or `default`.
    #[arg(short, long, default_value = "default")]
    model: String,
    /// Training recipe (TOML, see configs/train/); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Training text: files, or directories whose *.txt files are read (never WikiText-2).
    #[arg(long, required = true, value_delimiter = ',')]
    data: Vec<PathBuf>,
    /// Run directory: training state, recipe, log.jsonl, plot.svg.
    #[arg(long)]
    run_dir: PathBuf,
    /// The leading lm_head rows served wider, ROWS:+BITS or `none` (see drq-quantize --help).
    #[arg(long, default_value_t = WideRowsSpec::DEFAULT)]
    wide_rows: WideRowsSpec,
    /// Output checkpoint (`.safetensors`), written when the run completes.
    #[arg(short, long)]
    out: PathBuf,
    /// Continue the run in --run-dir from its saved state (its recipe; no recipe flags).
    #[arg(long, conflicts_with = "init")]
    resume: bool,
    /// Start from this checkpoint of --model instead of the recipe's PTQ (e.g. a block-wise
    /// reconstruction, then a short pass with `--train scales`): its codes, scales and norms.
    /// Its granularity and tie rule must be the recipe's; it may not carry corrections.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Save the state and stop after this many steps (continue later with --resume).
    #[arg(long)]
    stop_at_step: Option<u64>,
    /// Where the model trains: `cpu`, `cuda` or `cuda:N` (a GPU needs a build with `--features
    /// cuda`; the optimizer and the checkpoint stay on the host).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Start over in a run directory that already holds a state, and overwrite --out.
    #[arg(long)]
    force: bool,
    /// Per-layer precision profiles to store in --out (TOML, see configs/profiles/); repeatable.
    /// Served and evaluated by name.
    #[arg(long)]
    profile: Vec<PathBuf>,

    /// Bit-widths trained jointly [recipe default: 8,4,2].
    #[arg(long, value_delimiter = ',', help_heading = "Recipe")]
    bits: Option<Vec<u32>>,
    /// `channel` or `group:N`.
    #[arg(long, help_heading = "Recipe")]
    granularity: Option<String>,
    /// Second-rounding tie rule: `even` or `up`.
    #[arg(long, help_heading = "Recipe")]
    tie: Option<String>,
    /// Initial scale search objective: `normalized` or `sum`.
    #[arg(long, help_heading = "Recipe")]
    objective: Option<String>,
    /// Grid of the initial scales: `symmetric` or `max-negative` (see drq-quantize --help).
    #[arg(long, help_heading = "Recipe")]
    grid: Option<String>,
    /// Keep weights whose name contains one of these in float (frozen).
    #[arg(long, value_delimiter = ',', help_heading = "Recipe")]
    keep_float: Option<Vec<String>>,
    /// What trains: `scales`, `scales+norms` or `all`.
    #[arg(long, help_heading = "Recipe")]
    train: Option<Trainable>,
    #[arg(long, help_heading = "Recipe")]
    steps: Option<u64>,
    /// Sequences per mini-batch.
    #[arg(long, help_heading = "Recipe")]
    batch: Option<usize>,
    /// Tokens per sequence.
    #[arg(long, help_heading = "Recipe")]
    seq_len: Option<usize>,
    /// Peak learning rate of weights, norms and biases.
    #[arg(long, help_heading = "Recipe")]
    lr: Option<f64>,
    /// Peak base learning rate of the scales (scaled per bit-width by ALRS).
    #[arg(long, help_heading = "Recipe")]
    scale_lr: Option<f64>,
    #[arg(long, help_heading = "Recipe")]
    warmup_steps: Option<u64>,
    #[arg(long, help_heading = "Recipe")]
    min_lr_ratio: Option<f64>,
    /// Weight decay of the latent weights (never scales or norms).
    #[arg(long, help_heading = "Recipe")]
    weight_decay: Option<f64>,
    /// Gradient clipping (L2 norm per group); 0 disables.
    #[arg(long, help_heading = "Recipe")]
    clip_grad: Option<f64>,
    /// ALRS policy: `none`, `eta`, `relative` or `literal`.
    #[arg(long, help_heading = "Recipe")]
    alrs: Option<AlrsPolicy>,
    /// `per-precision` (a step per bit-width, the paper's loop) or `summed` (one step).
    #[arg(long = "loop", help_heading = "Recipe")]
    loop_mode: Option<LoopMode>,
    /// Adam moments of the scales: `shared` or `per-precision`.
    #[arg(long, help_heading = "Recipe")]
    scale_moments: Option<ScaleMoments>,
    /// Distillation weight (0: none, 1: KL only).
    #[arg(long, help_heading = "Recipe")]
    kd_weight: Option<f64>,
    #[arg(long, help_heading = "Recipe")]
    kd_temperature: Option<f64>,
    /// Distillation teacher: `float` or `w8`.
    #[arg(long, help_heading = "Recipe")]
    kd_teacher: Option<Teacher>,
    /// Seed of the data shuffle.
    #[arg(long, help_heading = "Recipe")]
    seed: Option<u64>,
    /// Evaluate the held-out slice every N steps (0: at the start and end only).
    #[arg(long, help_heading = "Recipe")]
    eval_every: Option<u64>,
    /// Blocks at the end of the text held out for evaluation.
    #[arg(long, help_heading = "Recipe")]
    heldout_blocks: Option<usize>,
    /// Save the training state every N steps (0: at the end and on Ctrl-C only).
    #[arg(long, help_heading = "Recipe")]
    save_every: Option<u64>,
    /// Hessian-aware bit-switching: the final probability that a layer draws its own
    /// bit-width (0: off; needs --switch-traces).
    #[arg(long, help_heading = "Recipe")]
    switch_sigma: Option<f64>,
    /// Traces of the float model (`drq-hasb traces`) telling bit-switching the sensitive layers.
    #[arg(long, help_heading = "Recipe")]
    switch_traces: Option<String>,
}

impl Args {
    /// Applies the recipe flags to `cfg`; returns whether any was given.
    fn apply(&self, cfg: &mut TrainConfig) -> bool {
        let mut any = false;
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => {$(
                if let Some(v) = &self.$field {
                    $target = v.clone();
                    any = true;
                }
            )*};
        }
        set!(
            bits => cfg.bits, granularity => cfg.granularity, tie => cfg.tie, objective => cfg.objective, grid => cfg.grid,
            keep_float => cfg.keep_float, train => cfg.train, steps => cfg.steps, batch => cfg.batch,
            seq_len => cfg.seq_len, lr => cfg.lr, scale_lr => cfg.scale_lr, warmup_steps => cfg.warmup_steps,
            min_lr_ratio => cfg.min_lr_ratio, weight_decay => cfg.weight_decay, clip_grad => cfg.clip_grad,
            alrs => cfg.alrs, loop_mode => cfg.loop_mode, scale_moments => cfg.scale_moments,
            kd_weight => cfg.kd.weight, kd_temperature => cfg.kd.temperature, kd_teacher => cfg.kd.teacher,
            seed => cfg.seed, eval_every => cfg.eval_every, heldout_blocks => cfg.heldout_blocks,
            save_every => cfg.save_every, switch_sigma => cfg.bit_switching.sigma,
            switch_traces => cfg.bit_switching.traces,
        );
        any
    }
}

fn main() {
    cli::run_main(|| run(Args::parse()));
}

const STATE: &str = "state.safetensors";
const LOG: &str = "log.jsonl";
const PLOT: &str = "plot.svg";
const RECIPE: &str = "recipe.toml";

/// Exit status after Ctrl-C (128 + SIGINT), once the state is saved.
const INTERRUPTED: i32 = 130;

/// `drq-train`, step by step: check the outputs, settle the recipe (new or resumed), load the
/// model and its training text, start or resume the trainer, train (evaluating, plotting and
/// saving on the way; stopping early on `--stop-at-step` or Ctrl-C), then write the checkpoint.
fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    check_out(&args)?;
    // Read before training, so that a bad profile fails now rather than after the run.
    let profiles = ProfileRules::load_all(&args.profile)?;
    let paths = RunPaths::new(&args.run_dir);
    let cfg = recipe(&args, &paths)?;
    let files = data::collect_files(&args.data)?;
    let device = cli::parse_device(&args.device)?;
    let interrupted = interrupt_flag()?;

    let source: ModelSource = args.model.parse()?;
    if matches!(source, ModelSource::Checkpoint(_)) {
        bail!("--model {}: training starts from a float model, not a checkpoint (see --init)", args.model);
    }
    // The starting checkpoint is opened (and validated) before the model is loaded.
    let init = match &args.init {
        Some(path) => Some(Checkpoint::open(path).with_context(|| format!("--init {}", path.display()))?),
        None => None,
    };
    tracing::info!("loading {source}");
    let (float, provenance) = source::load_float(&source)?;
    if let Some(ckpt) = &init {
        ensure!(
            ckpt.provenance().source_sha256 == provenance.sha256,
            "--init {} was made from another model than --model {}",
            ckpt.path().display(),
            args.model
        );
    }
    let eos = float.config.eos_token_ids.first().copied();
    tracing::info!("tokenizing {} file(s)", files.len());
    let blocks = TokenBlocks::from_files(&float.tokenizer, &files, eos, cfg.seq_len, cfg.heldout_blocks)?;
    tracing::info!(
        "{} training blocks and {} held-out blocks of {} tokens",
        blocks.train.len(),
        blocks.heldout.len(),
        cfg.seq_len + 1
    );

    std::fs::create_dir_all(&args.run_dir).with_context(|| format!("cannot create {}", args.run_dir.display()))?;
    let mut trainer = if args.resume {
        let t = Trainer::resume(float, &paths.state, &blocks, &provenance.sha256, &device)?;
        runlog::truncate(&paths.log, t.step_count())?;
        tracing::info!("resuming at step {} of {}", t.step_count(), cfg.steps);
        t
    } else {
        let t = match &init {
            Some(ckpt) => {
                tracing::info!(
                    "initial codes and scales: {} ({})",
                    ckpt.path().display(),
                    ckpt.quantization().scale_method
                );
                Trainer::from_checkpoint(float, cfg.clone(), ckpt, &device)?
            }
            None => {
                tracing::info!("initial scales: PTQ search ({})", cfg.quant_spec()?);
                Trainer::new(float, cfg.clone(), &device)?
            }
        };
        write_atomically(&paths.log, b"")?;
        write_atomically(&paths.recipe, toml::to_string(&cfg)?.as_bytes())?;
        t
    };
    ensure!(
        trainer.step_count() < cfg.steps,
        "the run is complete ({} steps); its checkpoint was written at the end",
        cfg.steps
    );

    let title = format!("drq-train {} — {} / alrs {} / train {}", args.model, cfg.granularity, cfg.alrs, cfg.train);
    let session =
        Session { args: &args, paths: &paths, cfg: &cfg, blocks: &blocks, source_sha256: &provenance.sha256, title };
    if let Ended::Early = session.train(&mut trainer, &interrupted)? {
        return Ok(());
    }

    let mut q = trainer.quantized_model()?;
    q.quantization.widen_rows(&args.wide_rows, &trainer.float_model().config)?;
    for p in &profiles {
        let bits = p.resolve(&q.quantization.quantized)?;
        q.quantization.add_profile(&p.name, bits)?;
    }
    write_checkpoint_as(&args.out, trainer.float_model(), &provenance, &q, "drq-train")?;
    session.plot()?;
    let peak = peak_rss_mib();
    tracing::info!(
        "wrote {} after {} steps in {:.1}s (log {}, plot {}){}",
        args.out.display(),
        cfg.steps,
        started.elapsed().as_secs_f64(),
        paths.log.display(),
        paths.plot.display(),
        peak.map(|m| format!("; peak RSS {m:.0} MiB")).unwrap_or_default()
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

/// The files of a run directory.
struct RunPaths {
    state: PathBuf,
    log: PathBuf,
    plot: PathBuf,
    recipe: PathBuf,
}

impl RunPaths {
    fn new(dir: &Path) -> Self {
        Self { state: dir.join(STATE), log: dir.join(LOG), plot: dir.join(PLOT), recipe: dir.join(RECIPE) }
    }
}

/// The recipe of the run: the saved one on `--resume` (which no flag may change), else
/// `--config` (or the default) with the flags applied, validated.
fn recipe(args: &Args, paths: &RunPaths) -> Result<TrainConfig> {
    let cfg = if args.resume {
        ensure!(paths.state.is_file(), "--resume: {} has no training state ({STATE})", args.run_dir.display());
        let mut probe = TrainConfig::default();
        if args.config.is_some() || args.apply(&mut probe) {
            bail!(
                "--resume continues the saved recipe ({}); recipe flags and --config cannot change it",
                paths.recipe.display()
            );
        }
        Trainer::state_config(&paths.state)?
    } else {
        if paths.state.exists() && !args.force {
            bail!(
                "{} already holds a training state: continue it with --resume, or start over with --force",
                args.run_dir.display()
            );
        }
        let mut cfg = match &args.config {
            Some(p) => TrainConfig::load(p)?,
            None => TrainConfig::default(),
        };
        args.apply(&mut cfg);
        cfg.validate()?;
        cfg
    };
    if let Some(stop) = args.stop_at_step {
        ensure!(stop >= 1 && stop < cfg.steps, "--stop-at-step must be between 1 and steps − 1 ({})", cfg.steps - 1);
    }
    Ok(cfg)
}

/// Set by the first Ctrl-C (the loop saves and exits after the step); a second one exits at once.
fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C: stop now (the last saved state is intact: saves are atomic).
            eprintln!("interrupted again: exiting without saving");
            std::process::exit(INTERRUPTED);
        }
        eprintln!("interrupt: saving the training state after this step (Ctrl-C again to quit now)");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(interrupted)
}

/// How the training loop ended.
enum Ended {
    /// Every step ran: the checkpoint comes next.
    Complete,
    /// `--stop-at-step` (the state is saved; `--resume` continues).
    Early,
}

/// What the training loop works with.
struct Session<'a> {
    args: &'a Args,
    paths: &'a RunPaths,
    cfg: &'a TrainConfig,
    blocks: &'a TokenBlocks,
    source_sha256: &'a str,
    title: String,
}

impl Session<'_> {
    /// Steps until the recipe's last: each logged; held-out perplexity and the plot every
    /// `eval_every` steps and at the end; the state saved every `save_every` steps, at the end,
    /// at `--stop-at-step` and on Ctrl-C (which then exits with status 130).
    fn train(&self, trainer: &mut Trainer, interrupted: &AtomicBool) -> Result<Ended> {
        let (cfg, log) = (self.cfg, &self.paths.log);
        let float_ppl = trainer.evaluate_float(self.blocks)?.exp();
        if trainer.step_count() == 0 {
            evaluate(trainer, self.blocks, log, Some(float_ppl))?;
            self.plot()?;
        }
        let bar = cli::progress_bar(cfg.steps, "training");
        bar.set_position(trainer.step_count());
        bar.reset_eta();
        let run_start = Instant::now();
        while trainer.step_count() < cfg.steps {
            let t0 = Instant::now();
            let r = trainer.step(self.blocks)?;
            let secs = t0.elapsed().as_secs_f64();
            let tokens_per_s = r.tokens as f64 / secs;
            let losses: Vec<String> = r.loss.iter().rev().map(|(b, l)| format!("W{b} {l:.3}")).collect();
            bar.set_prefix(format!("{} | {tokens_per_s:.0} tok/s", losses.join(" ")));
            bar.set_position(r.step);
            if !console_is_tty() {
                tracing::info!("step {}/{}: loss {} | {tokens_per_s:.0} tok/s", r.step, cfg.steps, losses.join(" "));
            }
            let step = r.step;
            runlog::append(
                log,
                &Record::Step {
                    step,
                    lr: r.lr,
                    scale_lr: r.scale_lr,
                    loss: r.loss,
                    ce: r.ce,
                    alrs_g: r.alrs_g,
                    scale_grad_norm: r.scale_grad_norm,
                    weight_grad_norm: r.weight_grad_norm,
                    tokens: r.tokens,
                    tokens_per_s,
                    elapsed_s: run_start.elapsed().as_secs_f64(),
                },
            )?;
            let last = step == cfg.steps;
            if last || (cfg.eval_every > 0 && step % cfg.eval_every == 0) {
                bar.suspend(|| evaluate(trainer, self.blocks, log, Some(float_ppl)))?;
                self.plot()?;
            }
            let stop = self.args.stop_at_step == Some(step);
            let interrupt = interrupted.load(Ordering::SeqCst);
            if last || stop || interrupt || (cfg.save_every > 0 && step % cfg.save_every == 0) {
                trainer.save_state(&self.paths.state, self.blocks, self.source_sha256)?;
            }
            if (stop || interrupt) && !last {
                bar.abandon();
                self.plot()?;
                eprintln!(
                    "{} at step {step}/{}: state saved in {}; continue with --resume --run-dir {}",
                    if interrupt { "interrupted" } else { "stopped" },
                    cfg.steps,
                    self.paths.state.display(),
                    self.args.run_dir.display()
                );
                if interrupt {
                    std::process::exit(INTERRUPTED);
                }
                return Ok(Ended::Early);
            }
        }
        bar.finish_and_clear();
        Ok(Ended::Complete)
    }

    /// Redraws `plot.svg` from the whole log.
    fn plot(&self) -> Result<()> {
        write_atomically(&self.paths.plot, runlog::plot_svg(&runlog::read(&self.paths.log)?, &self.title).as_bytes())
    }
}

/// Held-out cross-entropy and perplexity per precision, logged and printed.
fn evaluate(trainer: &Trainer, blocks: &TokenBlocks, log_path: &Path, float_ppl: Option<f64>) -> Result<()> {
    let ce = trainer.evaluate(blocks)?;
    let ppl = ce.iter().map(|(&b, &c)| (b, c.exp())).collect::<std::collections::BTreeMap<_, _>>();
    let shown: Vec<String> = ppl.iter().rev().map(|(b, p)| format!("W{b} {p:.3}")).collect();
    tracing::info!(
        "step {}: held-out perplexity {}{}",
        trainer.step_count(),
        shown.join(", "),
        float_ppl.map(|p| format!(" (float {p:.3})")).unwrap_or_default()
    );
    runlog::append(log_path, &Record::Eval { step: trainer.step_count(), ce, ppl, float_ppl })
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// VmHWM (peak resident set) of this process, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
