//! The decode thread: continuous batching over one llama.cpp context.
//!
//! Each step:
//! 1. take new jobs from the channel into the wait queue (FIFO);
//! 2. drop slots whose client went away, freeing their KV cells;
//! 3. admit waiting jobs into free slots, highest priority first; a job
//!    that is not preemptible, finding none free, stops the preemptible
//!    one with the lowest priority (the free tier runs on idle capacity);
//! 4. build one batch: one token for every generating slot first, then
//!    prompt tokens while room is left; while any stream is generating, at
//!    most `prompt_chunk_tokens` prompt tokens per step, so a long prompt is
//!    spread over several steps and never stalls the streams already running;
//! 5. decode, then sample each slot that asked for logits and stream out.
//!
//! Shared prefixes: a new request whose prompt starts with at least
//! `MIN_SHARED_PREFIX_TOKENS` of a running slot's prompt (a common system
//! prompt, or the same question asked many times) copies those KV cells from
//! that slot instead of computing them. If the source has not computed them
//! yet, the new slot waits for it: eight identical prompts arriving together
//! cost one prompt pass, not eight.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::Sender;

use crate::ffi::{Batch, Context, Model, Sampler, Token};
use crate::text::{StopMatcher, StopScan, Utf8Buf};
use crate::{
    EngineStats, Error, Event, Finish, FinishReason, GenerateRequest, TokenLogprob,
    MIN_SHARED_PREFIX_TOKENS,
};

pub struct Job {
    pub req: GenerateRequest,
    pub seed: u32,
    pub tx: Sender<Event>,
    pub enqueued_at: Instant,
}

pub struct Limits {
    pub parallel: u32,
    pub ctx_per_slot: u32,
    pub batch_tokens: u32,
    pub prompt_chunk_tokens: u32,
}

struct Slot {
    seq: i32,
    prompt: Vec<Token>,
    /// Prompt tokens already decoded into the KV cache.
    fed: usize,
    /// Prompt tokens placed in the current step's batch.
    feeding: usize,
    /// The last sampled token, fed in the next step.
    next_token: Option<Token>,
    /// Every sampled token; all but the last are in the KV cache.
    generated: Vec<Token>,
    max_tokens: u32,
    sampler: Sampler,
    utf8: Utf8Buf,
    stop: StopMatcher,
    /// Top logprobs asked for per token, if any.
    logprobs: Option<u8>,
    tx: Sender<Event>,
    /// Batch index of this slot's logits in the current step.
    logits_at: Option<i32>,
    /// Distinguishes this job from earlier and later ones in the same slot.
    job_id: u64,
    /// Copy leading KV cells from another job's slot before feeding.
    share: Option<Share>,
    piece: Vec<u8>,
    priority: i64,
    preemptible: bool,
}

fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[derive(Clone, Copy)]
struct Share {
    slot: usize,
    job_id: u64,
    n_tokens: usize,
}

/// What an idle slot's KV cells still hold after its request ended.
struct Cached {
    tokens: Vec<Token>,
    /// The id of the job that left it, for least-recently-used eviction.
    stamp: u64,
}

impl Slot {
    /// Tokens in this sequence's KV cache: the prompt fed so far and every
    /// sampled token but the last, which is fed in the next step.
    fn kv_len(&self) -> usize {
        self.fed + self.generated.len().saturating_sub(1)
    }
}

pub struct Scheduler {
    model: Arc<Model>,
    ctx: Context,
    batch: Batch,
    limits: Limits,
    slots: Vec<Option<Slot>>,
    /// Per slot: the tokens its KV cells hold while no request uses it.
    cached: Vec<Option<Cached>>,
    waiting: VecDeque<Job>,
    stats: Arc<EngineStats>,
    next_job_id: u64,
}

impl Scheduler {
    pub fn new(model: Arc<Model>, ctx: Context, limits: Limits, stats: Arc<EngineStats>) -> Self {
        let batch = Batch::new(limits.batch_tokens as usize, limits.parallel as i32);
        let slots = (0..limits.parallel).map(|_| None).collect();
        let cached = (0..limits.parallel).map(|_| None).collect();
        Self {
            model,
            ctx,
            batch,
            limits,
            slots,
            cached,
            waiting: VecDeque::new(),
            stats,
            next_job_id: 0,
        }
    }

    /// Runs until every `Engine` handle is gone.
    pub fn run(mut self, jobs: Receiver<Job>) {
        loop {
            let idle = self.waiting.is_empty() && self.slots.iter().all(Option::is_none);
            if idle {
                match jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.waiting.is_empty() && self.slots.iter().all(Option::is_none) {
                            return;
                        }
                        break;
                    }
                }
            }
            self.reap_cancelled();
            self.admit();
            self.step();
        }
    }

    fn reap_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.tx.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.queued.fetch_sub(gone, Ordering::AcqRel);
        }
        for i in 0..self.slots.len() {
            if self.slots[i].as_ref().is_some_and(|s| s.tx.is_closed()) {
                self.free(i, true);
            }
        }
    }

    /// Frees slot `i` for the next request at once. Its KV cells stay as a
    /// prompt cache (`keep`) that the next request in this slot reuses as
    /// far as its prompt matches and otherwise overwrites; after a failed
    /// decode they are cleared.
    fn free(&mut self, i: usize, keep: bool) {
        let Some(slot) = self.slots[i].take() else {
            return;
        };
        self.stats.slots_busy.fetch_sub(1, Ordering::AcqRel);
        if keep && slot.fed > 0 && slot.share.is_none() {
            // Exactly what `kv_len` counts: the prompt fed so far (sampling
            // starts only once it is whole) and the tokens fed back.
            let fed_back = slot.generated.len().saturating_sub(1);
            let mut tokens = slot.prompt;
            tokens.truncate(slot.fed);
            tokens.extend_from_slice(&slot.generated[..fed_back]);
            self.cached[i] = Some(Cached {
                tokens,
                stamp: slot.job_id,
            });
        } else {
            self.ctx.clear_seq(slot.seq);
            self.cached[i] = None;
        }
    }

    /// The free slot for `prompt`, and how many of its cached KV cells the
    /// prompt can reuse: the longest cached prefix match wins, then an empty
    /// slot, then the least recently used cache.
    fn pick_slot(&self, prompt: &[Token]) -> Option<(usize, usize)> {
        let free = || (0..self.slots.len()).filter(|&i| self.slots[i].is_none());
        let reuse_of = |i: usize| {
            self.cached[i].as_ref().map_or(0, |c| {
                common_prefix(&c.tokens, prompt).min(prompt.len() - 1)
            })
        };
        if let Some(best) = free().max_by_key(|&i| (reuse_of(i), usize::MAX - i)) {
            let reuse = reuse_of(best);
            if reuse > 0 {
                return Some((best, reuse));
            }
        }
        free()
            .min_by_key(|&i| self.cached[i].as_ref().map_or(0, |c| c.stamp + 1))
            .map(|i| (i, 0))
    }

    fn admit(&mut self) {
        while !self.waiting.is_empty() {
            // Requests that are not preemptible first, then the highest
            // priority; the earliest among equals.
            let Some(next) = self
                .waiting
                .iter()
                .enumerate()
                .max_by_key(|(i, j)| (!j.req.preemptible, j.req.priority, std::cmp::Reverse(*i)))
                .map(|(i, _)| i)
            else {
                return;
            };
            let Some(job) = self.waiting.get(next) else {
                return;
            };
            let mut pick = self.pick_slot(&job.req.prompt);
            if pick.is_none() && !job.req.preemptible && self.preempt_one() {
                pick = self
                    .waiting
                    .get(next)
                    .and_then(|job| self.pick_slot(&job.req.prompt));
            }
            let Some((free, reuse)) = pick else {
                return;
            };
            let Some(job) = self.waiting.remove(next) else {
                return;
            };
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            let sampler = match Sampler::new(
                &self.model,
                &job.req.sampling,
                job.seed,
                job.req.grammar.as_ref(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    let _ = job.tx.try_send(Event::Failed(e));
                    continue;
                }
            };
            tracing::trace!(
                slot = free,
                waited_ms = job.enqueued_at.elapsed().as_millis() as u64,
                "admitted"
            );
            let share = self
                .best_shared_prefix(&job.req.prompt)
                .filter(|s| s.n_tokens > reuse);
            // Keep the reusable cached prefix; drop the rest (all of it when
            // another slot has a longer prefix to copy).
            let reuse = if share.is_some() { 0 } else { reuse };
            if self.cached[free].take().is_some() {
                if reuse == 0 {
                    self.ctx.clear_seq(free as i32);
                } else {
                    self.ctx.trim_seq(free as i32, reuse);
                    self.stats
                        .prompt_tokens_reused
                        .fetch_add(reuse as u64, Ordering::Relaxed);
                }
            }
            self.next_job_id += 1;
            let room = self.limits.ctx_per_slot as usize - job.req.prompt.len();
            let max_tokens = job.req.max_tokens.map_or(room, |m| (m as usize).min(room)) as u32;
            self.slots[free] = Some(Slot {
                seq: free as i32,
                prompt: job.req.prompt,
                fed: reuse,
                feeding: 0,
                next_token: None,
                generated: Vec::new(),
                max_tokens,
                sampler,
                utf8: Utf8Buf::default(),
                stop: StopMatcher::new(&job.req.stop),
                logprobs: job.req.logprobs,
                tx: job.tx,
                logits_at: None,
                job_id: self.next_job_id,
                share,
                piece: Vec::with_capacity(64),
                priority: job.req.priority,
                preemptible: job.req.preemptible,
            });
            self.stats.slots_busy.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Stops the preemptible running request with the lowest priority (the
    /// latest admitted among equals) and frees its slot; false when none
    /// runs. Its client gets `Error::Preempted`.
    fn preempt_one(&mut self) -> bool {
        let Some(i) = (0..self.slots.len())
            .filter_map(|i| self.slots[i].as_ref().map(|s| (i, s)))
            .filter(|(_, s)| s.preemptible)
            .min_by_key(|(_, s)| (s.priority, std::cmp::Reverse(s.job_id)))
            .map(|(i, _)| i)
        else {
            return false;
        };
        if let Some(slot) = &self.slots[i] {
            // A full channel: dropping the sender still ends the stream.
            let _ = slot.tx.try_send(Event::Failed(Error::Preempted));
        }
        self.stats.preempted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(slot = i, "preempted for a request that is not preemptible");
        self.free(i, true);
        true
    }

    /// The running slot sharing the longest prompt prefix with `prompt`, and
    /// how many tokens to copy (never the last one: its logits are needed).
    fn best_shared_prefix(&self, prompt: &[Token]) -> Option<Share> {
        let mut best: Option<Share> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            if slot.share.is_some() {
                continue;
            }
            let common = slot
                .prompt
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len() - 1);
            if common >= MIN_SHARED_PREFIX_TOKENS && best.is_none_or(|b| common > b.n_tokens) {
                best = Some(Share {
                    slot: i,
                    job_id: slot.job_id,
                    n_tokens: common,
                });
            }
        }
        best
    }

    /// Performs the prefix copies whose source has computed enough.
    fn copy_shared_prefixes(&mut self) {
        for i in 0..self.slots.len() {
            let Some(share) = self.slots[i].as_ref().and_then(|s| s.share) else {
                continue;
            };
            let source_fed = self.slots[share.slot]
                .as_ref()
                .filter(|s| s.job_id == share.job_id)
                .map(|s| s.fed);
            let ready = match source_fed {
                Some(fed) if fed >= share.n_tokens => true,
                Some(_) => continue,
                // The source finished or was cancelled: compute the prompt.
                None => false,
            };
            let Some(slot) = self.slots[i].as_mut() else {
                continue;
            };
            slot.share = None;
            if ready {
                self.ctx
                    .copy_prefix(share.slot as i32, slot.seq, share.n_tokens);
                slot.fed = share.n_tokens;
                self.stats
                    .prompt_tokens_reused
                    .fetch_add(share.n_tokens as u64, Ordering::Relaxed);
            }
        }
    }

    fn step(&mut self) {
        self.copy_shared_prefixes();
        self.batch.clear();
        // Generating slots first: one token each, always fits because the
        // batch holds at least `parallel` tokens.
        for slot in self.slots.iter_mut().flatten() {
            slot.logits_at = None;
            if let Some(tok) = slot.next_token {
                slot.logits_at = Some(self.batch.push(tok, slot.kv_len() as i32, slot.seq, true));
            }
        }
        // Then prompt chunks while room is left. While other streams are
        // generating, prompts get at most `prompt_chunk_tokens` per step, so
        // a long prompt delays each running stream by one small chunk at a
        // time; with nobody waiting on a token, prompts fill the batch.
        let generating = !self.batch.is_empty();
        let mut prompt_budget = if generating {
            self.limits.prompt_chunk_tokens as usize
        } else {
            usize::MAX
        };
        for slot in self.slots.iter_mut().flatten() {
            if slot.next_token.is_some() || slot.fed >= slot.prompt.len() || slot.share.is_some() {
                continue;
            }
            let chunk = (slot.prompt.len() - slot.fed)
                .min(self.batch.remaining())
                .min(prompt_budget);
            if chunk == 0 {
                break;
            }
            prompt_budget -= chunk;
            slot.feeding = chunk;
            for k in 0..chunk {
                let idx = slot.fed + k;
                let last = idx + 1 == slot.prompt.len();
                let at = self
                    .batch
                    .push(slot.prompt[idx], idx as i32, slot.seq, last);
                if last {
                    slot.logits_at = Some(at);
                }
            }
        }
        if self.batch.is_empty() {
            return;
        }
        if let Err(rc) = self.ctx.decode(&self.batch) {
            tracing::error!(
                rc,
                "llama_decode failed; failing the requests in this batch"
            );
            for i in 0..self.slots.len() {
                let in_batch = self.slots[i]
                    .as_ref()
                    .is_some_and(|s| s.next_token.is_some() || s.feeding > 0);
                if in_batch {
                    if let Some(s) = &self.slots[i] {
                        let _ = s.tx.try_send(Event::Failed(Error::Decode(rc)));
                    }
                    self.free(i, false);
                }
            }
            return;
        }
        // Account for what was decoded.
        for slot in self.slots.iter_mut().flatten() {
            if slot.next_token.take().is_none() {
                slot.fed += std::mem::take(&mut slot.feeding);
            }
        }
        for i in 0..self.slots.len() {
            if let Some(finish) = self.sample_slot(i) {
                if let Some(slot) = &self.slots[i] {
                    let _ = slot.tx.try_send(finish);
                }
                self.free(i, true);
            }
        }
    }

    /// Samples slot `i` if it has logits this step. Returns the final event
    /// when the generation has ended.
    fn sample_slot(&mut self, i: usize) -> Option<Event> {
        let slot = self.slots[i].as_mut()?;
        let at = slot.logits_at.take()?;
        let n_vocab = self.model.n_vocab();
        let tok = slot.sampler.sample(&mut self.ctx, at, n_vocab);
        slot.generated.push(tok);
        let model = &self.model;
        let logprob = slot.logprobs.and_then(|n| {
            let (lp, top) = Sampler::logprobs(&self.ctx, at, n_vocab, tok, n as usize)?;
            let bytes = |t: Token| {
                let mut b = Vec::new();
                model.piece(t, &mut b);
                b
            };
            Some(Box::new(TokenLogprob {
                bytes: bytes(tok),
                logprob: lp,
                top: top.into_iter().map(|(t, l)| (bytes(t), l)).collect(),
            }))
        });
        let prompt_tokens = slot.prompt.len() as u32;
        // Ending without a stop string: release whatever text was held.
        let done = |slot: &mut Slot, reason: FinishReason| {
            let text = slot.utf8.finish();
            let (text, reason, stop_sequence) = match slot.stop.push(&text) {
                StopScan::Emit(t) => (t + &slot.stop.finish(), reason, None),
                StopScan::Stopped(t, i) => (t, FinishReason::Stop, Some(i)),
            };
            Some(Event::Done {
                text,
                finish: Finish {
                    reason,
                    prompt_tokens,
                    completion_tokens: slot.generated.len() as u32,
                    stop_sequence,
                },
            })
        };
        if self.model.is_eog(tok) {
            // Every generated token is one event, the end token included
            // (with no text): what a client or a peer counts is what was
            // generated.
            let _ = slot.tx.try_send(Event::Token {
                id: tok,
                text: String::new(),
                logprob,
            });
            return done(slot, FinishReason::Stop);
        }
        slot.piece.clear();
        self.model.piece(tok, &mut slot.piece);
        let text = slot.utf8.push(&slot.piece);
        match slot.stop.push(&text) {
            StopScan::Stopped(before, i) => {
                let _ = slot.tx.try_send(Event::Token {
                    id: tok,
                    text: before,
                    logprob,
                });
                return Some(Event::Done {
                    text: String::new(),
                    finish: Finish {
                        reason: FinishReason::Stop,
                        prompt_tokens,
                        completion_tokens: slot.generated.len() as u32,
                        stop_sequence: Some(i),
                    },
                });
            }
            StopScan::Emit(out) => {
                let _ = slot.tx.try_send(Event::Token {
                    id: tok,
                    text: out,
                    logprob,
                });
            }
        }
        if slot.generated.len() >= slot.max_tokens as usize {
            return done(slot, FinishReason::Length);
        }
        slot.next_token = Some(tok);
        None
    }
}
