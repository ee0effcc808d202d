//! Roots: hypha's inference engine.
//!
//! One [`Engine`] owns one loaded GGUF model and one llama.cpp context with
//! `parallel` sequence slots. A dedicated decode thread runs continuous
//! batching: every step it admits queued requests into free slots, builds one
//! batch holding one token for each generating slot plus chunks of pending
//! prompts, decodes it, samples each slot's next token with that request's own
//! sampler, and streams the text out. A request whose receiver is dropped is
//! cancelled at the next step and its KV cells are freed at once.
//!
//! Everything that touches llama.cpp's C API lives in `ffi`; this crate is the
//! only one in hypha allowed `unsafe`.
// Peer and client bytes reach this crate: nothing here may panic on them.
#![deny(clippy::unwrap_used)]

mod ffi;
mod sched;
pub mod text;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use ffi::{json_schema_to_grammar, DeviceInfo, DeviceKind, Token};

/// Slots (concurrent sequences) when the caller does not say.
pub const DEFAULT_PARALLEL: u32 = 8;
/// llama.cpp's hard limit on sequences in one context.
pub const MAX_PARALLEL: u32 = 256;
/// Context per slot when the caller does not say; the model's training
/// context caps it.
pub const DEFAULT_CTX_PER_SLOT: u32 = 2048;
/// Requests allowed to wait for a slot before new ones are refused.
pub const DEFAULT_QUEUE_MAX: usize = 64;
/// Tokens decoded in one step at most (llama.cpp's n_batch).
pub const DEFAULT_BATCH_TOKENS: u32 = 512;
/// Prompt tokens decoded in one step while other streams are generating, so
/// a long prompt delays them by one small chunk at a time (about 0.4 s per
/// 64 tokens on one slow core), not by the whole prompt.
pub const DEFAULT_PROMPT_CHUNK_TOKENS: u32 = 64;
/// A shared prompt prefix shorter than this is recomputed rather than copied
/// from another slot: copying moves the whole KV stream, which only pays off
/// for a few tokens' worth of compute.
pub const MIN_SHARED_PREFIX_TOKENS: usize = 8;

/// Errors from loading, configuring or running the engine.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("model file not found: {0}")]
    ModelNotFound(PathBuf),
    #[error("cannot load model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    #[error("no ggml backend library found (searched: {searched}); set HYPHA_BACKENDS_DIR to the folder holding libggml-cpu-*.so")]
    NoBackend { searched: String },
    #[error("device {wanted} is not available; devices found: {found}")]
    DeviceUnavailable { wanted: String, found: String },
    #[error("llama.cpp could not create a context (out of memory?)")]
    ContextCreate,
    #[error("could not build a sampler")]
    Sampler,
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt is too large")]
    PromptTooLarge,
    #[error(
        "the prompt's {bytes} bytes cannot fit the context of {max_tokens} tokens per request"
    )]
    PromptBytes { bytes: usize, max_tokens: u32 },
    #[error("prompt has {prompt_tokens} tokens but the context holds {max_tokens} per request")]
    ContextExceeded { prompt_tokens: u32, max_tokens: u32 },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the queue is full ({queued} requests waiting for a slot)")]
    QueueFull { queued: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error(
        "stopped to make room for a request with credits: the free tier runs on idle capacity only"
    )]
    Preempted,
    #[error("decode failed (llama.cpp code {0})")]
    Decode(i32),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Which compute device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best GPU found, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
    Rocm,
    Vulkan,
}

impl DeviceChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
            Self::Rocm => "rocm",
            Self::Vulkan => "vulkan",
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda,
            "metal" => Self::Metal,
            "rocm" | "hip" => Self::Rocm,
            "vulkan" => Self::Vulkan,
            other => {
                return Err(Error::Config(format!(
                    "unknown device {other:?} (auto, cpu, cuda, metal, rocm, vulkan)"
                )))
            }
        })
    }
}

/// How many layers to offload to a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// All of them when a GPU is used.
    #[default]
    Auto,
    Count(u32),
}

impl std::str::FromStr for GpuLayers {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        s.parse::<u32>()
            .map(Self::Count)
            .map_err(|_| Error::Config(format!("--gpu-layers takes auto or a number, not {s:?}")))
    }
}

/// Everything needed to start an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub parallel: u32,
    /// Context tokens per slot; 0 means the default capped by the model.
    pub ctx_per_slot: u32,
    pub threads: u32,
    pub device: DeviceChoice,
    pub gpu_layers: GpuLayers,
    pub queue_max: usize,
    pub batch_tokens: u32,
    pub prompt_chunk_tokens: u32,
    /// Extra folders searched first for ggml backend libraries.
    pub backend_dirs: Vec<PathBuf>,
    /// Also serve embeddings (a second context of one sequence of
    /// `ctx_per_slot` tokens, see [`Engine::embed`]).
    pub embeddings: bool,
}

impl EngineConfig {
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            parallel: DEFAULT_PARALLEL,
            ctx_per_slot: 0,
            threads: default_threads(),
            device: DeviceChoice::Auto,
            gpu_layers: GpuLayers::Auto,
            queue_max: DEFAULT_QUEUE_MAX,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            prompt_chunk_tokens: DEFAULT_PROMPT_CHUNK_TOKENS,
            backend_dirs: Vec::new(),
            embeddings: false,
        }
    }
}

/// Decode threads by default: all cores but one, so the node's network and
/// HTTP tasks always have a core to run on.
pub fn default_threads() -> u32 {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(n.saturating_sub(1).max(1)).unwrap_or(1)
}

/// What a loaded model is.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Short name: the file name without `.gguf`.
    pub name: String,
    pub path: PathBuf,
    pub architecture: String,
    pub n_ctx_train: u32,
    pub ctx_per_slot: u32,
    pub parallel: u32,
    pub n_params: u64,
    /// The length of an embedding (the model's hidden width).
    pub n_embd: u32,
    pub size_bytes: u64,
    pub description: String,
    pub chat_template: Option<String>,
    /// The text of the model's end-of-sequence token (templates write it
    /// after an assistant turn); empty when it has none.
    pub eos_token: String,
    /// The most prompt bytes one token can stand for (the longest piece in
    /// the vocabulary).
    pub longest_piece: usize,
    /// The device the model runs on, in words.
    pub device: String,
    pub threads: u32,
}

/// One chat message, as OpenAI's API has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: i32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Same seed, same output; `None` draws a fresh one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks that every setting is in its range (what [`Engine::submit`]
    /// checks first); the edges check it before a prompt is tokenized.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::InvalidRequest(what.to_owned()));
        if !self.temperature.is_finite() || !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature must be between 0 and 2");
        }
        if !self.top_p.is_finite() || !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            return bad("top_p must be in (0, 1]");
        }
        if self.top_k < 0 {
            return bad("top_k must not be negative");
        }
        if !self.min_p.is_finite() || !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be between 0 and 1");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repetition_penalty must be positive");
        }
        for (v, name) in [
            (self.frequency_penalty, "frequency_penalty"),
            (self.presence_penalty, "presence_penalty"),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return Err(Error::InvalidRequest(format!(
                    "{name} must be between -2 and 2"
                )));
            }
        }
        Ok(())
    }

    /// The 32-bit seed llama.cpp takes: the request's, folded, or a fresh one.
    fn resolved_seed(&self) -> u32 {
        match self.seed {
            Some(s) => (s ^ (s >> 32)) as u32,
            None => fresh_seed(),
        }
    }
}

fn fresh_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

/// A tokenized request ready for the engine.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<Token>,
    pub sampling: SamplingParams,
    /// `None`: until an end token, a stop string or the slot's context is full.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    /// A GBNF grammar (root rule `root`) the generated text stays within
    /// (see [`json_schema_to_grammar`]); `None` for free text.
    pub grammar: Option<Grammar>,
    /// Report each token's log-probability and those of this many of the
    /// likeliest tokens (at most [`MAX_TOP_LOGPROBS`]); `None`: none.
    pub logprobs: Option<u8>,
    /// Waiting requests are admitted highest priority first, in arrival
    /// order among equals (all that are not preemptible before any that
    /// is).
    pub priority: i64,
    /// Runs only on idle capacity: stopped (`Error::Preempted`) when a
    /// request that is not preemptible waits and no slot is free.
    pub preemptible: bool,
}

/// A grammar the sampled text keeps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grammar {
    /// GBNF, root rule `root`.
    pub gbnf: String,
    /// `None`: the whole text keeps to the grammar. `Some(word)`: the text
    /// is free until `word` appears in it, and from `word` on (`word`
    /// included) it keeps to the grammar (a tool call's start marker).
    pub lazy_trigger: Option<String>,
}

impl Grammar {
    /// A grammar the whole text keeps to.
    pub fn whole(gbnf: String) -> Self {
        Self {
            gbnf,
            lazy_trigger: None,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the slot's context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// The summary sent when a generation ends.
#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// The index in the request's `stop` of the stop string that ended the
    /// generation (its reason is then [`FinishReason::Stop`]); `None` when
    /// something else ended it.
    pub stop_sequence: Option<usize>,
}

/// Most alternatives a request may ask the log-probabilities of, per
/// token (OpenAI's `top_logprobs` allows 20).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// The log-probability of one generated token under the model (its raw
/// distribution, before any sampling setting), and of the most likely
/// tokens at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's bytes (a piece may be part of a character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely tokens, most likely first: their bytes and
    /// log-probabilities.
    pub top: Vec<(Vec<u8>, f32)>,
}

/// What a running generation streams.
#[derive(Debug, Clone)]
pub enum Event {
    /// One sampled token and the text it completes. `text` may be empty when
    /// the token ends in the middle of a character or of a possible stop
    /// string (held text comes out with a later token or with `Done`), and
    /// is empty for the end-of-generation token, which is reported too: the
    /// `Token` events of a generation number `completion_tokens`.
    /// `logprob` is there when the request asked for logprobs.
    Token {
        id: Token,
        text: String,
        logprob: Option<Box<TokenLogprob>>,
    },
    /// The generation ended; `text` is any held text released at the end.
    Done { text: String, finish: Finish },
    /// The generation failed.
    Failed(Error),
}

/// A handle on one running generation. Dropping it cancels the generation.
pub struct Generation {
    rx: tokio::sync::mpsc::Receiver<Event>,
    pub prompt_tokens: u32,
}

impl Generation {
    /// The next event; `None` once the generation has ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Blocking form of [`Generation::next`], for threads outside a runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

/// Live counters the node exports as metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub slots_busy: AtomicUsize,
    /// Prompt tokens whose KV was copied from another slot, not computed.
    pub prompt_tokens_reused: AtomicU64,
    /// Preemptible requests stopped to make room for others.
    pub preempted: AtomicU64,
}

/// A running engine. Cheap to clone; the decode thread stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    model: Arc<ffi::Model>,
    info: ModelInfo,
    /// `None` only while the last clone drops.
    jobs: Option<std::sync::mpsc::SyncSender<sched::Job>>,
    /// The decode thread, joined when the last clone drops.
    decoder: Option<std::thread::JoinHandle<()>>,
    stats: Arc<EngineStats>,
    queue_max: usize,
    /// The embedding context, when the engine serves embeddings: one input
    /// at a time.
    embedder: Option<std::sync::Mutex<ffi::Embedder>>,
}

impl Drop for Inner {
    /// Closes the queue and waits for the decode thread to finish what it
    /// runs and free the context: no thread is left inside llama.cpp when
    /// the process exits (its libraries' teardown would pull the model out
    /// from under it).
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.decoder.take() {
            if t.join().is_err() {
                tracing::warn!("the decode thread panicked");
            }
        }
    }
}

impl Engine {
    /// Loads the model and starts the decode thread.
    pub fn start(cfg: EngineConfig) -> Result<Self, Error> {
        if cfg.parallel == 0 || cfg.parallel > MAX_PARALLEL {
            return Err(Error::Config(format!(
                "parallel must be between 1 and {MAX_PARALLEL}"
            )));
        }
        if cfg.threads == 0 || cfg.batch_tokens == 0 || cfg.prompt_chunk_tokens == 0 {
            return Err(Error::Config(
                "threads, batch tokens and prompt chunk must be at least 1".into(),
            ));
        }
        if cfg.batch_tokens < cfg.parallel {
            return Err(Error::Config(format!(
                "batch tokens ({}) must be at least the number of slots ({})",
                cfg.batch_tokens, cfg.parallel
            )));
        }
        check_gguf(&cfg.model_path)?;
        let mut search = cfg.backend_dirs.clone();
        search.extend(backend_search_path());
        let backends_dir = ffi::init_backends(&search)?;
        tracing::debug!(dir = %backends_dir.display(), "ggml backends loaded");
        let mut placement = ffi::place(cfg.device, cfg.gpu_layers)?;
        let model = Arc::new(ffi::Model::load(&cfg.model_path, &mut placement)?);
        let n_ctx_train = model.n_ctx_train();
        let ctx_per_slot = match cfg.ctx_per_slot {
            0 => DEFAULT_CTX_PER_SLOT.min(n_ctx_train.max(1)),
            n => n,
        };
        let n_ctx = ctx_per_slot
            .checked_mul(cfg.parallel)
            .ok_or_else(|| Error::Config("context size overflows".into()))?;
        let ctx = ffi::Context::new(
            model.clone(),
            &ffi::ContextParams {
                n_ctx,
                n_batch: cfg.batch_tokens,
                n_seq_max: cfg.parallel,
                n_threads: i32::try_from(cfg.threads).unwrap_or(i32::MAX),
            },
        )?;
        let ctx_per_slot = ctx.n_ctx_seq();
        let info = ModelInfo {
            name: model_name(&cfg.model_path),
            path: cfg.model_path.clone(),
            architecture: model.meta("general.architecture").unwrap_or_default(),
            n_ctx_train,
            ctx_per_slot,
            parallel: cfg.parallel,
            n_params: model.n_params(),
            n_embd: model.n_embd(),
            size_bytes: model.size_bytes(),
            description: model.description(),
            chat_template: model.chat_template(),
            eos_token: model.eos_text(),
            longest_piece: model.longest_piece(),
            device: placement.described.clone(),
            threads: cfg.threads,
        };
        tracing::info!(
            model = %info.name,
            device = %info.device,
            slots = cfg.parallel,
            ctx_per_slot,
            threads = cfg.threads,
            "engine ready"
        );
        let embedder = if cfg.embeddings {
            Some(std::sync::Mutex::new(ffi::Embedder::new(
                model.clone(),
                ctx_per_slot,
                i32::try_from(cfg.threads).unwrap_or(i32::MAX),
            )?))
        } else {
            None
        };
        let stats = Arc::new(EngineStats::default());
        // Every job in the channel has been counted in `stats.queued`, which
        // never exceeds `queue_max`, so this channel never blocks a sender.
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(cfg.queue_max.max(1));
        let sched = sched::Scheduler::new(
            model.clone(),
            ctx,
            sched::Limits {
                parallel: cfg.parallel,
                ctx_per_slot,
                batch_tokens: cfg.batch_tokens,
                prompt_chunk_tokens: cfg.prompt_chunk_tokens,
            },
            stats.clone(),
        );
        let decoder = std::thread::Builder::new()
            .name("hypha-decode".into())
            .spawn(move || sched.run(jobs_rx))
            .map_err(|e| Error::Config(format!("cannot start the decode thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                info,
                jobs: Some(jobs_tx),
                decoder: Some(decoder),
                stats,
                queue_max: cfg.queue_max,
                embedder,
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    /// Formats chat messages with the model's own template (ChatML when the
    /// model carries none).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, Error> {
        if messages.is_empty() {
            return Err(Error::InvalidRequest("messages must not be empty".into()));
        }
        let template = self.inner.info.chat_template.as_deref().unwrap_or("chatml");
        self.inner.model.apply_template(template, messages)
    }

    /// Refuses, without tokenizing, a prompt of `bytes` bytes that cannot
    /// fit a slot's context whatever its tokens: no token stands for more
    /// than [`ModelInfo::longest_piece`] bytes, and a template only adds.
    /// Twice that bound is allowed, so no prompt that fits is refused.
    pub fn check_prompt_bytes(&self, bytes: usize) -> Result<(), Error> {
        let info = &self.inner.info;
        let max = (info.ctx_per_slot as usize)
            .saturating_mul(info.longest_piece.max(1))
            .saturating_mul(2);
        if bytes > max {
            return Err(Error::PromptBytes {
                bytes,
                max_tokens: info.ctx_per_slot,
            });
        }
        Ok(())
    }

    /// Fails with [`Error::QueueFull`] when a request submitted now would
    /// be refused for a full queue: checked before work a refusal wastes.
    pub fn check_queue(&self) -> Result<(), Error> {
        let q = self.inner.stats.queued.load(Ordering::Acquire);
        if q >= self.inner.queue_max {
            return Err(Error::QueueFull { queued: q });
        }
        Ok(())
    }

    /// True when the engine serves embeddings.
    pub fn embeds(&self) -> bool {
        self.inner.embedder.is_some()
    }

    /// The embedding of `tokens` (scaled to unit length), computed on the
    /// embedding context; blocks, so call it off async workers. Inputs are
    /// taken one at a time.
    pub fn embed(&self, tokens: &[Token]) -> Result<Vec<f32>, Error> {
        let Some(e) = &self.inner.embedder else {
            return Err(Error::InvalidRequest(
                "this engine serves no embeddings (start it with embeddings on)".into(),
            ));
        };
        let n_vocab = self.inner.model.n_vocab();
        if tokens.iter().any(|&t| t < 0 || t >= n_vocab) {
            return Err(Error::InvalidRequest(
                "an input holds an unknown token id".into(),
            ));
        }
        // A panic while it was held cannot have left the context half
        // used: `embed` clears its sequence on every path.
        let mut guard = e.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.embed(tokens)
    }

    /// Tokenizes text, adding the model's start token when it wants one.
    pub fn tokenize(&self, text: &str) -> Result<Vec<Token>, Error> {
        self.inner.model.tokenize(text, true)
    }

    /// Queues a request. Fails at once when the prompt cannot fit or the
    /// queue is full; otherwise tokens stream from the returned handle.
    pub fn submit(&self, req: GenerateRequest) -> Result<Generation, Error> {
        req.sampling.validate()?;
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if req.max_tokens == Some(0) {
            return Err(Error::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if req.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::InvalidRequest(format!(
                "at most {MAX_TOP_LOGPROBS} top logprobs per token"
            )));
        }
        let n_vocab = self.inner.model.n_vocab();
        if req.prompt.iter().any(|&t| t < 0 || t >= n_vocab) {
            return Err(Error::InvalidRequest(
                "prompt holds an unknown token id".into(),
            ));
        }
        let prompt_tokens = u32::try_from(req.prompt.len()).map_err(|_| Error::PromptTooLarge)?;
        let max = self.inner.info.ctx_per_slot;
        // One cell must stay free for the first generated token.
        if prompt_tokens >= max {
            return Err(Error::ContextExceeded {
                prompt_tokens,
                max_tokens: max,
            });
        }
        let queued = &self.inner.stats.queued;
        let admitted = queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
            (q < self.inner.queue_max).then_some(q + 1)
        });
        if let Err(q) = admitted {
            return Err(Error::QueueFull { queued: q });
        }
        // Each token produces at most one event, plus the final one; this
        // bound means the decode thread never waits on a slow client.
        let cap = req.max_tokens.unwrap_or(max).min(max) as usize + 2;
        let (tx, rx) = tokio::sync::mpsc::channel(cap);
        let job = sched::Job {
            seed: req.sampling.resolved_seed(),
            req,
            tx,
            enqueued_at: Instant::now(),
        };
        let sent = self
            .inner
            .jobs
            .as_ref()
            .is_some_and(|j| j.try_send(job).is_ok());
        if !sent {
            queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Stopped);
        }
        Ok(Generation { rx, prompt_tokens })
    }
}

/// Rejects what is plainly not a GGUF file before llama.cpp sees it.
fn check_gguf(path: &Path) -> Result<(), Error> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::ModelNotFound(path.to_path_buf()))
        }
        Err(e) => {
            return Err(Error::ModelLoad {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(Error::ModelLoad {
            path: path.to_path_buf(),
            reason: "not a GGUF file (bad magic)".into(),
        });
    }
    Ok(())
}

fn model_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf").unwrap_or(&name).to_owned()
}

/// Where ggml's backend libraries are looked for, in order:
/// `$HYPHA_BACKENDS_DIR`, beside the executable (and its `backends/` folder
/// and the parent, for test binaries in `deps/`), then where the build put
/// them.
pub fn backend_search_path() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("HYPHA_BACKENDS_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("backends"));
        dirs.push(exe_dir.clone());
        if let Some(parent) = exe_dir.parent() {
            dirs.push(parent.join("backends"));
        }
    }
    if let Some(d) = option_env!("HYPHA_BUILD_BACKENDS_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// Devices ggml can see (after the backends are loaded).
pub fn list_devices(extra_dirs: &[PathBuf]) -> Result<Vec<DeviceInfo>, Error> {
    let mut search = extra_dirs.to_vec();
    search.extend(backend_search_path());
    ffi::init_backends(&search)?;
    Ok(ffi::devices())
}
