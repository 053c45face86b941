//! The generation engine: one resident copy of a checkpoint, one scheduler thread, continuous
//! batching across precisions.
//!
//! Requests wait in a bounded queue; between two steps the scheduler admits waiting requests
//! into the running batch (each of a request's `n` choices is one sequence) and drops those whose
//! client went away. One step runs every running sequence (a prefill chunk or one decode token
//! each) through [`Transformer::forward_batches`], one batch per precision present: each weight
//! is read once per step for all sequences and precisions, the kernels serving every precision
//! from the same pass over its planes. The transformers of all precisions share the resident
//! weights: serving 8, 4 and 2 bits at once costs no more memory than serving one.
//!
//! With [`EngineOptions::gpu`] the steps run on an NVIDIA GPU instead
//! ([`model::transformer::cuda`]): the weights uploaded once for every precision, each running
//! sequence in a slot of one key/value arena (`max_batch` slots of `max_context` positions), one
//! GPU step per precision present (in pieces of up to 64 rows), the logits copied back for
//! sampling. Scheduling, sampling and streaming are the same code.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use kernels::cuda::{CudaRuntime, KvArena};
use kernels::KernelConfig;
use model::checkpoint::Checkpoint;
use model::transformer::cuda::{CudaTransformer, GpuResident, GpuRow};
use model::{Batch, KvCache, ModelConfig, Precision, ResidentModel, SequenceStep, Transformer};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::metrics::{precision_label, FinishLabel, Metrics};
use crate::sampling::{log_softmax, top_logprobs, Sampler, SamplingParams};
use crate::text::IncrementalText;

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Requests waiting for a slot beyond which new ones are refused.
    pub max_queue: usize,
    /// Positions per sequence (prompt + generated), at most the model's.
    pub max_context: usize,
    /// Prompt tokens prefilled per step, over all sequences: bounds the pause a long prompt
    /// imposes on the sequences already decoding.
    pub prefill_chunk: usize,
    /// Precision of requests that name none.
    pub default_precision: Precision,
    pub kernel: KernelConfig,
    /// Run the steps on this GPU (our CUDA kernels, f32 activations) instead of the CPU.
    pub gpu: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 64,
            max_context: 4096,
            prefill_chunk: 256,
            default_precision: Precision::Bits(8),
            kernel: KernelConfig::default(),
            gpu: None,
        }
    }
}

/// A validated generation request (token ids, not text).
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// One of [`ModelInfo::precisions`].
    pub precision: Precision,
    /// Independent choices; choice `i` samples with seed `sampling.seed + i`.
    pub n: usize,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Report each generated token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What a request's receiver gets, per choice.
#[derive(Debug)]
pub enum Event {
    /// One generated token and the text it releases (possibly empty: incomplete characters and
    /// possible starts of a stop string are held back).
    Token { choice: usize, text: String, logprob: Option<TokenLogprob> },
    /// The choice ended; `text` is what was still held back.
    Finished { choice: usize, reason: FinishReason, text: String, completion_tokens: usize },
    /// The choice failed (an internal error); nothing more comes for it.
    Failed { choice: usize, message: String },
}

/// A request that cannot be served as it is: what is wrong, and the OpenAI field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRequest {
    pub message: String,
    pub param: Option<&'static str>,
}

impl InvalidRequest {
    pub fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self { message: message.into(), param: Some(param) }
    }
}

impl std::fmt::Display for InvalidRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The request cannot be served as it is.
    Invalid(InvalidRequest),
    /// The queue is full: retry later.
    QueueFull,
    /// The engine stopped.
    Stopped,
}

/// A named per-layer profile the checkpoint carries.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProfileInfo {
    pub name: String,
    /// Code bits per quantized weight, averaged over the weights (scales not included).
    pub mean_bits: f64,
}

/// What the engine serves, for `GET /v1/models` and request validation.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Every precision a request may name, as the checkpoint offers them: its bit-widths, then
    /// its profiles.
    pub precisions: Vec<Precision>,
    pub profiles: Vec<ProfileInfo>,
    /// The bit set the checkpoint's scales were searched for.
    pub calibrated_bits: Vec<u32>,
    pub default_precision: Precision,
    pub max_context: usize,
    pub vocab_size: usize,
    /// Sequences decoded together: the most choices (`n`) one request may ask for.
    pub max_batch: usize,
}

impl ModelInfo {
    /// The served precisions, as a request names them: `2, 3, …, 8, mix`.
    pub fn precision_names(&self) -> Vec<String> {
        self.precisions.iter().map(Precision::to_string).collect()
    }

    /// The refusal of a precision this engine does not serve.
    pub fn not_served(&self, name: &str) -> InvalidRequest {
        InvalidRequest::new(
            "precision",
            format!("precision `{name}` is not served; use one of {}", self.precision_names().join(", ")),
        )
    }

    /// The one check of a request against what this engine serves: its precision, the prompt
    /// and `max_tokens` within the context, token ids within the vocabulary, and `n`. Run by
    /// [`Engine::submit`] for every caller; the HTTP edge reports its error as a 400 naming
    /// `param`.
    pub fn validate(&self, r: &GenerationRequest) -> Result<(), InvalidRequest> {
        if r.n == 0 || r.n > self.max_batch {
            return Err(InvalidRequest::new(
                "n",
                format!("n must be between 1 and {} (this server's batch), got {}", self.max_batch, r.n),
            ));
        }
        if !self.precisions.contains(&r.precision) {
            return Err(self.not_served(&r.precision.to_string()));
        }
        if r.prompt.is_empty() {
            return Err(InvalidRequest::new("prompt", "the prompt is empty"));
        }
        if r.prompt.len() >= self.max_context {
            return Err(InvalidRequest::new(
                "prompt",
                format!(
                    "the prompt has {} tokens, but this server's context is {} tokens, including at least one generated",
                    r.prompt.len(),
                    self.max_context
                ),
            ));
        }
        if let Some(&bad) = r.prompt.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(InvalidRequest::new(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {}", self.vocab_size),
            ));
        }
        if r.max_tokens == 0 {
            return Err(InvalidRequest::new("max_tokens", "max_tokens must be at least 1"));
        }
        if r.prompt.len() + r.max_tokens > self.max_context {
            return Err(InvalidRequest::new(
                "max_tokens",
                format!(
                    "the prompt ({} tokens) plus max_tokens ({}) exceed this server's context of {} tokens",
                    r.prompt.len(),
                    r.max_tokens,
                    self.max_context
                ),
            ));
        }
        Ok(())
    }
}

/// Handle to the engine; the scheduler thread stops when it is dropped (after the running
/// sequences finish).
pub struct Engine {
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    chat: Option<ChatTemplate>,
    bos: Option<u32>,
    submit: Mutex<Option<Sender<Queued>>>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    metrics: Arc<Metrics>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Builds the resident layout of `checkpoint` and starts the scheduler.
    pub fn start(checkpoint: &Checkpoint, options: EngineOptions, metrics: Arc<Metrics>) -> Result<Self> {
        ensure!(options.max_batch >= 1, "max batch must be at least 1");
        ensure!(options.prefill_chunk >= 1, "prefill chunk must be at least 1");
        let config = checkpoint.config().clone();
        ensure!(
            (2..=config.max_position_embeddings).contains(&options.max_context),
            "context {} is outside 2..={} (the model's)",
            options.max_context,
            config.max_position_embeddings
        );
        let resident = ResidentModel::from_checkpoint(checkpoint)?;
        // Every precision the checkpoint offers (bit-widths and named per-layer profiles), all
        // served from the same resident copy.
        let precisions = checkpoint.quantization().precisions();
        let mut transformers = BTreeMap::new();
        for precision in &precisions {
            transformers.insert(precision.clone(), Transformer::from_resident(&resident, precision, &options.kernel)?);
        }
        let mut profiles = Vec::new();
        for (name, bits) in resident.profiles() {
            let (mut weights, mut weighted) = (0usize, 0usize);
            for (w, planar) in resident.planar_weights() {
                let (n, b) = (planar.rows() * planar.cols(), bits[w]);
                let wide = resident.leading_rows(w, b).map_or(0, |l| l.rows * planar.cols() * (l.bits - b) as usize);
                weights += n;
                weighted += n * b as usize + wide;
            }
            profiles.push(ProfileInfo { name: name.clone(), mean_bits: weighted as f64 / weights.max(1) as f64 });
        }
        ensure!(
            transformers.contains_key(&options.default_precision),
            "default precision `{}` is not one of {}",
            options.default_precision,
            precisions.iter().map(Precision::to_string).collect::<Vec<_>>().join(", ")
        );
        let tokenizer = Arc::new(checkpoint.tokenizer()?);
        let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        let chat = checkpoint
            .chat_template()
            .map(|source| {
                ChatTemplate::new(
                    source,
                    &token_text(config.bos_token_id),
                    &token_text(config.eos_token_ids.first().copied()),
                )
            })
            .transpose()?;
        let info = ModelInfo {
            precisions,
            profiles,
            calibrated_bits: checkpoint.quantization().bits.clone(),
            default_precision: options.default_precision.clone(),
            max_context: options.max_context,
            vocab_size: config.vocab_size,
            max_batch: options.max_batch,
        };
        let gpu = match options.gpu {
            Some(ordinal) => Some(GpuServing::new(ordinal, &transformers, &options)?),
            None => None,
        };
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let scheduler = Scheduler {
            transformers,
            gpu,
            config: config.clone(),
            tokenizer: tokenizer.clone(),
            options: options.clone(),
            rx,
            waiting_count: waiting.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            metrics: metrics.clone(),
        };
        let thread = std::thread::Builder::new().name("drq-scheduler".into()).spawn(move || scheduler.run())?;
        Ok(Self {
            info,
            tokenizer,
            chat,
            bos: if checkpoint.add_bos() { config.bos_token_id } else { None },
            submit: Mutex::new(Some(tx)),
            waiting,
            max_queue: options.max_queue,
            metrics,
            thread: Some(thread),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The checkpoint's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of a completion prompt (BOS first when the model uses one).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(self.bos.into_iter().chain(encoding.get_ids().iter().copied()).collect())
    }

    /// Token ids of a chat, through the model's chat template.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let Some(chat) = &self.chat else { bail!("this model has no chat template; use /v1/completions") };
        let text = chat.render(messages)?;
        // Templates write BOS themselves where the model wants it.
        let encoding = self.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Queues `request`; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, request: GenerationRequest) -> Result<UnboundedReceiver<Event>, SubmitError> {
        self.info.validate(&request).map_err(SubmitError::Invalid)?;
        let guard = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else { return Err(SubmitError::Stopped) };
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.rejected.inc();
            return Err(SubmitError::QueueFull);
        }
        let (events, receiver) = unbounded_channel();
        self.metrics.requests.get_or_create(&precision_label(&request.precision)).inc();
        self.metrics.queue_depth.inc();
        if tx.send(Queued { request: Arc::new(request), events }).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_depth.dec();
            return Err(SubmitError::Stopped);
        }
        Ok(receiver)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.submit.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Queued {
    request: Arc<GenerationRequest>,
    events: UnboundedSender<Event>,
}

impl Sequence {
    /// The GPU slot the sequence holds, if it runs on the GPU.
    fn slot(&self) -> Option<usize> {
        match self.cache {
            SeqCache::Gpu { slot, .. } => Some(slot),
            SeqCache::Host(_) => None,
        }
    }
}

/// One choice of a request in the running batch.
struct Sequence {
    request: Arc<GenerationRequest>,
    events: UnboundedSender<Event>,
    choice: usize,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    cache: SeqCache,
    /// The last sampled token (the next step's input once the prompt is in).
    last: u32,
    generated: usize,
    text: IncrementalText,
    sampler: Sampler,
    last_token_at: Option<Instant>,
}

/// Where a sequence's keys and values are.
enum SeqCache {
    Host(KvCache),
    /// A slot of the GPU arena and the positions written there.
    Gpu {
        slot: usize,
        len: usize,
    },
}

impl SeqCache {
    fn len(&self) -> usize {
        match self {
            SeqCache::Host(c) => c.len(),
            SeqCache::Gpu { len, .. } => *len,
        }
    }
}

/// The GPU side of an engine: every precision's transformer on the device over one upload of
/// the weights, and one key/value arena whose slots the running sequences hold.
struct GpuServing {
    transformers: BTreeMap<Precision, CudaTransformer>,
    arena: KvArena,
    free_slots: Vec<usize>,
}

impl GpuServing {
    fn new(ordinal: usize, transformers: &BTreeMap<Precision, Transformer>, options: &EngineOptions) -> Result<Self> {
        let rt = Arc::new(CudaRuntime::new(ordinal)?);
        tracing::info!("serving on GPU {ordinal}: {} (f32 activations)", rt.device_name());
        let mut upload = GpuResident::new(rt);
        let transformers = transformers
            .iter()
            .map(|(p, t)| Ok((p.clone(), t.to_cuda(&mut upload)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let any = transformers.values().next().context("no precision to serve")?;
        let arena = any.kv_arena(options.max_batch, options.max_context)?;
        Ok(GpuServing { transformers, arena, free_slots: (0..options.max_batch).rev().collect() })
    }

    /// What comes after the last token of each sequence's input, running `members` (slot,
    /// tokens, first position) at `precision` on the GPU: the tokens picked there when `draws`
    /// gives each member's `(1 / temperature, uniform)` (only ids cross to the host), else the
    /// logits.
    fn forward(
        &mut self,
        precision: &Precision,
        members: &[(usize, &[u32], usize)],
        draws: Option<&[(f32, f64)]>,
    ) -> Result<Vec<StepOutput>> {
        let t = self.transformers.get(precision).with_context(|| format!("precision {precision} is not served"))?;
        let vocab = t.config().vocab_size;
        let rows: Vec<GpuRow> =
            members.iter().flat_map(|&(slot, tokens, start)| GpuRow::sequence(slot, start, tokens)).collect();
        if let Some(draws) = draws {
            return Ok(t.step_sample(&mut self.arena, &rows, draws)?.into_iter().map(StepOutput::Token).collect());
        }
        let logits = t.step_logits(&mut self.arena, &rows)?;
        Ok(logits.chunks_exact(vocab).map(|row| StepOutput::Logits(row.to_vec())).collect())
    }
}

/// What a step gives a sequence: its logits, or (picked on a GPU) its token.
enum StepOutput {
    Logits(Vec<f32>),
    Token(u32),
}

struct Scheduler {
    transformers: BTreeMap<Precision, Transformer>,
    gpu: Option<GpuServing>,
    config: ModelConfig,
    tokenizer: Arc<Tokenizer>,
    options: EngineOptions,
    rx: Receiver<Queued>,
    waiting_count: Arc<AtomicUsize>,
    waiting: VecDeque<Queued>,
    running: Vec<Sequence>,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(q) => self.waiting.push_back(q),
                    Err(_) => return, // the engine was dropped and nothing is left to do
                }
            }
            while let Ok(q) = self.rx.try_recv() {
                self.waiting.push_back(q);
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|q| !q.events.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.waiting_count.fetch_sub(gone, Ordering::SeqCst);
            self.metrics.queue_depth.dec_by(gone as i64);
        }
        let metrics = &self.metrics;
        let mut freed = Vec::new();
        self.running.retain(|s| {
            let open = !s.events.is_closed();
            if !open {
                finished(metrics, &s.request.precision, "cancelled");
                freed.extend(s.slot());
            }
            open
        });
        self.release(freed);
        self.metrics.running.set(self.running.len() as i64);
    }

    /// Gives GPU slots of finished sequences back.
    fn release(&mut self, slots: Vec<usize>) {
        if let Some(gpu) = &mut self.gpu {
            gpu.free_slots.extend(slots);
        }
    }

    /// Moves waiting requests into the batch while their choices fit (first come, first served).
    fn admit(&mut self) {
        while let Some(q) = self.waiting.front() {
            let n = q.request.n;
            if self.running.len() + n > self.options.max_batch && !self.running.is_empty() {
                break;
            }
            let q = self.waiting.pop_front().expect("front exists");
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_depth.dec();
            let r = &q.request;
            self.metrics.prompt_tokens.get_or_create(&precision_label(&r.precision)).inc_by(r.prompt.len() as u64);
            for choice in 0..n {
                let sampling =
                    SamplingParams { seed: r.sampling.seed.wrapping_add(choice as u64), ..r.sampling.clone() };
                let cache = match &mut self.gpu {
                    None => SeqCache::Host(KvCache::new(&self.config)),
                    // Requests ask for at most max_batch choices and at most max_batch run: a
                    // slot is free for each (checked, not assumed).
                    Some(gpu) => match gpu.free_slots.pop() {
                        Some(slot) => SeqCache::Gpu { slot, len: 0 },
                        None => {
                            let message = "no free key/value slot on the GPU".to_string();
                            let _ = q.events.send(Event::Failed { choice, message });
                            finished(&self.metrics, &r.precision, "error");
                            continue;
                        }
                    },
                };
                self.running.push(Sequence {
                    request: r.clone(),
                    events: q.events.clone(),
                    choice,
                    prefilled: 0,
                    cache,
                    last: 0,
                    generated: 0,
                    text: IncrementalText::new(self.tokenizer.clone(), r.stop.clone()),
                    sampler: Sampler::new(sampling),
                    last_token_at: None,
                });
            }
        }
        self.metrics.running.set(self.running.len() as i64);
    }

    /// One forward pass over the running sequences of every precision, then sampling.
    fn step(&mut self) {
        if self.gpu.is_some() {
            return self.step_gpu();
        }
        let inputs = self.inputs();
        // One batch per precision present, all run in one step.
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut steps: Vec<Vec<SequenceStep<'_>>> = Vec::new();
        let mut precisions = Vec::new();
        let mut by_precision: BTreeMap<&Precision, usize> = BTreeMap::new();
        for (i, (seq, input)) in self.running.iter_mut().zip(&inputs).enumerate() {
            let Some(tokens) = input else { continue };
            let k = *by_precision.entry(&seq.request.precision).or_insert_with(|| {
                precisions.push(seq.request.precision.clone());
                members.push(Vec::new());
                steps.push(Vec::new());
                members.len() - 1
            });
            members[k].push(i);
            let SeqCache::Host(cache) = &mut seq.cache else { unreachable!("a CPU engine holds host caches") };
            steps[k].push(SequenceStep { tokens, cache });
        }
        let mut outputs: Vec<Option<Result<StepOutput, String>>> = (0..inputs.len()).map(|_| None).collect();
        // Admission checked every precision against the transformers built at start; one that
        // is not there fails its sequences rather than leaving them waiting.
        let mut batches = Vec::with_capacity(steps.len());
        let mut served = Vec::with_capacity(steps.len());
        for ((precision, steps), members) in precisions.iter().zip(steps.iter_mut()).zip(&members) {
            match self.transformers.get(precision) {
                Some(transformer) => {
                    batches.push(Batch { transformer, steps });
                    served.push(members);
                }
                None => {
                    for &i in members {
                        outputs[i] = Some(Err(format!("precision {precision} is not served by this engine")));
                    }
                }
            }
        }
        let result = Transformer::forward_batches(&mut batches)
            .and_then(|ts| ts.iter().map(|t| Ok(t.to_vec2::<f32>()?)).collect::<Result<Vec<_>>>())
            .context("forward pass");
        match result {
            Ok(per_batch) => {
                for (rows, members) in per_batch.into_iter().zip(&served) {
                    for (&i, row) in members.iter().zip(rows) {
                        outputs[i] = Some(Ok(StepOutput::Logits(row)));
                    }
                }
            }
            Err(e) => {
                tracing::error!("{e:#}");
                for &i in served.iter().copied().flatten() {
                    outputs[i] = Some(Err(format!("{e:#}")));
                }
            }
        }
        drop(batches);
        drop(steps);
        self.finish_step(outputs, &inputs);
    }

    /// [`Self::step`] on the GPU: one GPU forward per precision present; a precision whose
    /// sequences all sample greedily or over the whole vocabulary without penalties or logprobs
    /// gets its tokens picked on the GPU (each draw's uniform from the sequence's own generator).
    fn step_gpu(&mut self) {
        let inputs = self.inputs();
        let mut by_precision: BTreeMap<Precision, Vec<usize>> = BTreeMap::new();
        for (i, (seq, input)) in self.running.iter().zip(&inputs).enumerate() {
            if input.is_some() {
                by_precision.entry(seq.request.precision.clone()).or_default().push(i);
            }
        }
        let mut outputs: Vec<Option<Result<StepOutput, String>>> = (0..inputs.len()).map(|_| None).collect();
        let gpu = self.gpu.as_mut().expect("a GPU engine");
        for (precision, members) in &by_precision {
            let rows: Vec<(usize, &[u32], usize)> = members
                .iter()
                .map(|&i| match (&self.running[i].cache, &inputs[i]) {
                    (SeqCache::Gpu { slot, len }, Some(tokens)) => (*slot, tokens.as_slice(), *len),
                    _ => unreachable!("GPU sequences with an input this step"),
                })
                .collect();
            // Every member's 1 / temperature first (none if one needs its logits here), so that
            // no generator moves unless the whole precision is picked on the device.
            let inv_t: Option<Vec<f32>> = members
                .iter()
                .map(|&i| {
                    let seq = &self.running[i];
                    seq.sampler.device_inv_temperature().filter(|_| seq.request.logprobs.is_none())
                })
                .collect();
            // A uniform is drawn only for a token that is sampled: after a prompt's last chunk.
            let draws: Option<Vec<(f32, f64)>> = inv_t.map(|inv_t| {
                members
                    .iter()
                    .zip(&rows)
                    .zip(inv_t)
                    .map(|((&i, &(_, tokens, _)), inv_t)| {
                        let seq = &mut self.running[i];
                        let samples = seq.prefilled + tokens.len() >= seq.request.prompt.len();
                        if inv_t != 0.0 && samples {
                            (inv_t, seq.sampler.next_uniform())
                        } else {
                            (0.0, 0.0)
                        }
                    })
                    .collect()
            });
            match gpu.forward(precision, &rows, draws.as_deref()).context("forward pass on the GPU") {
                Ok(rows) => {
                    for (&i, row) in members.iter().zip(rows) {
                        outputs[i] = Some(Ok(row));
                    }
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    for &i in members {
                        outputs[i] = Some(Err(format!("{e:#}")));
                    }
                }
            }
        }
        for (seq, (row, input)) in self.running.iter_mut().zip(outputs.iter().zip(&inputs)) {
            if let (SeqCache::Gpu { len, .. }, Some(Ok(_)), Some(tokens)) = (&mut seq.cache, row, input) {
                *len += tokens.len();
            }
        }
        self.finish_step(outputs, &inputs);
    }

    /// Each sequence's input this step: a prompt chunk within the shared budget, or its last
    /// token; `None` for one left out (budget spent), which waits for the next step.
    fn inputs(&self) -> Vec<Option<Vec<u32>>> {
        let mut budget = self.options.prefill_chunk;
        self.running
            .iter()
            .map(|s| {
                let prompt = &s.request.prompt;
                if s.prefilled < prompt.len() {
                    let take = (prompt.len() - s.prefilled).min(budget);
                    budget -= take;
                    (take > 0).then(|| prompt[s.prefilled..s.prefilled + take].to_vec())
                } else {
                    Some(vec![s.last])
                }
            })
            .collect()
    }

    /// Samples (or fails) every sequence that ran this step and drops the finished ones.
    fn finish_step(&mut self, outputs: Vec<Option<Result<StepOutput, String>>>, inputs: &[Option<Vec<u32>>]) {
        let mut done = vec![false; self.running.len()];
        for (i, (row, input)) in outputs.into_iter().zip(inputs).enumerate() {
            let (Some(row), Some(input)) = (row, input) else { continue };
            done[i] = match row {
                Ok(row) => self.advance(i, input.len(), row),
                Err(message) => {
                    let seq = &self.running[i];
                    let _ = seq.events.send(Event::Failed { choice: seq.choice, message });
                    finished(&self.metrics, &seq.request.precision, "error");
                    true
                }
            };
        }
        let mut i = 0;
        let mut freed = Vec::new();
        self.running.retain(|s| {
            i += 1;
            if done[i - 1] {
                freed.extend(s.slot());
            }
            !done[i - 1]
        });
        self.release(freed);
        self.metrics.running.set(self.running.len() as i64);
    }

    /// Books a forward pass of `consumed` tokens of sequence `i`; samples when its prompt is
    /// in. Returns whether the sequence is done.
    fn advance(&mut self, i: usize, consumed: usize, output: StepOutput) -> bool {
        let eos = &self.config.eos_token_ids;
        let max_context = self.options.max_context;
        let tokenizer = &self.tokenizer;
        let metrics = &self.metrics;
        let seq = &mut self.running[i];
        let r = seq.request.clone();
        if seq.prefilled < r.prompt.len() {
            seq.prefilled += consumed;
            if seq.prefilled < r.prompt.len() {
                return false;
            }
        }
        let (token, logprob_of) = match output {
            StepOutput::Logits(mut row) => {
                let logprob_of = r.logprobs.map(|k| (log_softmax(&row), k));
                (seq.sampler.sample(&mut row), logprob_of)
            }
            StepOutput::Token(token) => {
                seq.sampler.accept(token);
                (token, None)
            }
        };
        let now = Instant::now();
        let label = precision_label(&r.precision);
        match seq.last_token_at {
            None => metrics.time_to_first_token.get_or_create(&label).observe((now - r.arrived).as_secs_f64()),
            Some(t) => metrics.inter_token_latency.get_or_create(&label).observe((now - t).as_secs_f64()),
        }
        seq.last_token_at = Some(now);
        seq.generated += 1;
        seq.last = token;
        metrics.generated_tokens.get_or_create(&label).inc();
        let finish = |seq: &mut Sequence, reason: FinishReason, text: String| -> bool {
            let _ =
                seq.events.send(Event::Finished { choice: seq.choice, reason, text, completion_tokens: seq.generated });
            finished(metrics, &seq.request.precision, reason.as_str());
            true
        };
        if eos.contains(&token) {
            let rest = seq.text.finish();
            return finish(seq, FinishReason::Stop, rest);
        }
        let delta = match seq.text.push(token) {
            Ok(d) => d,
            Err(e) => {
                let _ = seq.events.send(Event::Failed { choice: seq.choice, message: format!("{e:#}") });
                finished(metrics, &r.precision, "error");
                return true;
            }
        };
        let logprob = logprob_of.map(|(lp, k)| {
            let piece = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
            TokenLogprob {
                token: piece(token),
                logprob: lp[token as usize],
                top: top_logprobs(&lp, k).into_iter().map(|(id, l)| (piece(id), l)).collect(),
            }
        });
        if seq.events.send(Event::Token { choice: seq.choice, text: delta.text, logprob }).is_err() {
            finished(metrics, &r.precision, "cancelled");
            return true;
        }
        if delta.stopped {
            return finish(seq, FinishReason::Stop, String::new());
        }
        // The next step would write position `cache.len()`.
        if seq.generated >= r.max_tokens || seq.cache.len() + 1 > max_context {
            let rest = seq.text.finish();
            return finish(seq, FinishReason::Length, rest);
        }
        false
    }
}

fn finished(metrics: &Metrics, precision: &Precision, reason: &str) {
    metrics.finished.get_or_create(&FinishLabel { precision: precision.to_string(), reason: reason.to_string() }).inc();
}
