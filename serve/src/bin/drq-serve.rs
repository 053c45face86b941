//! `drq-serve`: serve one INT8 Double Rounding checkpoint over OpenAI's HTTP API, each request
//! at the precision it asks for.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use cli::Activations;
use kernels::KernelConfig;
use model::checkpoint::WideRowsSpec;
use model::Precision;
use quantize::profile::ProfileRules;
use serve::engine::{Engine, EngineOptions};
use serve::http::{router, AppState, DEFAULT_BODY_LIMIT};
use serve::metrics::Metrics;

#[derive(Parser)]
#[command(
    name = "drq-serve",
    version,
    about = "Serve a drq checkpoint over an OpenAI-compatible HTTP API, every request at its own precision"
)]
struct Args {
    /// Model: a drq checkpoint, or any source (hub repo id, Hugging Face directory, GGUF file,
    /// `default` = SmolLM2-135M-Instruct), which is then quantized first and cached.
    #[arg(short, long, default_value = "default")]
    model: String,
    /// PTQ recipe (TOML, see configs/ptq/) when --model is not a checkpoint [default: group:128,
    /// bits 8,4,2: on SmolLM2 W8 +0.44% and W4 43.7 perplexity vs +0.92% and 75.0 per channel, at
    /// the same kernel speed].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Per-layer precision profile (TOML, see configs/profiles/) to serve by its name besides
    /// those the checkpoint stores; repeatable.
    #[arg(long)]
    profile: Vec<PathBuf>,
    /// The leading lm_head rows served wider, ROWS:+BITS or `none` (see drq-quantize --help),
    /// instead of what the checkpoint stores (the file is not changed) or the recipe gives
    /// [default: the checkpoint's; for other sources the recipe's, 4096:+1 without one].
    #[arg(long)]
    wide_rows: Option<WideRowsSpec>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Precision of requests that do not name one: a bit-width (2..8) or a profile's name.
    #[arg(long, default_value = "8")]
    default_precision: String,
    /// Sequences decoded together in one step (a request with n choices takes n).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting for a batch slot beyond which new ones get 503 + Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Positions per sequence, prompt included [default: the model's, at most 4096].
    #[arg(long)]
    ctx: Option<usize>,
    /// Prompt tokens prefilled per step over all sequences (bounds the stall of running ones).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Kernel threads (default: every core).
    #[arg(long, default_value_t = cli::cores())]
    threads: usize,
    /// Activations of the kernels: `auto` (int8 per weight scale group at 4 bits and below, int8
    /// per 16 columns above on AVX-512 CPUs, f32 on others), `f32` (exact products of the dequantized weights), `int8` (quantized
    /// on the fly per scale group: fastest, and costs accuracy: on WikiText-2 +0.8% perplexity at
    /// 8 bits with group:128 scales) or `int8-fine` (per 16 columns: +0.12% at 8 bits; see
    /// docs/RESULTS.md).
    #[arg(long, value_enum, default_value = "auto")]
    activations: Activations,
    /// Where the steps run: `cpu`, or `cuda` / `cuda:N` (our CUDA kernels, f32 activations, every
    /// precision from one upload of the weights; needs only the NVIDIA driver).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Require `Authorization: Bearer <key>` on /v1 (also from DRQ_API_KEY).
    #[arg(long, env = "DRQ_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model id clients use [default: the checkpoint's file name or the source].
    #[arg(long)]
    model_id: Option<String>,
    /// Largest request body, in bytes (larger ones get 413).
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT)]
    body_limit: usize,
}

fn main() {
    cli::run_main(|| run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    let mut settings = serve::load::ptq_settings(args.config.as_deref())?;
    settings.wide_rows = args.wide_rows.unwrap_or(settings.wide_rows);
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("invalid --host/--port {}:{}", args.host, args.port))?;
    let default_precision: Precision =
        args.default_precision.parse().with_context(|| format!("default precision `{}`", args.default_precision))?;
    let gpu = cli::gpu_ordinal(&args.device)?;
    anyhow::ensure!(
        gpu.is_none() || args.activations != Activations::Int8,
        "--device {}: the GPU kernels take f32 activations",
        args.device
    );
    let profiles = ProfileRules::load_all(&args.profile)?;
    let mut checkpoint = serve::load::open_or_quantize(&args.model, &settings, &model::source::pypi::drq_cache_dir()?)?;
    if let Some(w) = &args.wide_rows {
        checkpoint.widen_rows(w)?;
    }
    for p in &profiles {
        let bits = p.resolve(&checkpoint.quantization().quantized)?;
        checkpoint.add_profile(&p.name, bits)?;
    }
    let model_ctx = checkpoint.config().max_position_embeddings;
    let options = EngineOptions {
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_context: args.ctx.unwrap_or(model_ctx.min(4096)),
        prefill_chunk: args.prefill_chunk,
        default_precision,
        kernel: KernelConfig { threads: args.threads, path: args.activations.path(), ..KernelConfig::default() },
        gpu,
    };
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let path = std::path::Path::new(&args.model);
        match (path.is_file(), path.file_name()) {
            (true, Some(name)) => name.to_string_lossy().trim_end_matches(".safetensors").to_string(),
            _ => args.model.clone(),
        }
    });
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::start(&checkpoint, options.clone(), metrics.clone())?;
    drop(checkpoint);
    let state = Arc::new(AppState {
        engine,
        metrics,
        model_id: model_id.clone(),
        api_key: args.api_key.clone(),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(
            "serving `{model_id}` on http://{} (precisions {}, default {}, batch {}, queue {}, context {})",
            listener.local_addr()?,
            state.engine.info().precision_names().join(","),
            options.default_precision,
            options.max_batch,
            options.max_queue,
            options.max_context
        );
        axum::serve(listener, router(state.clone(), args.body_limit)).with_graceful_shutdown(shutdown_signal()).await?;
        tracing::info!("stopped accepting; in-flight requests finished");
        anyhow::Ok(())
    })
}

/// SIGTERM or Ctrl-C: stop accepting connections and let in-flight requests finish.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
