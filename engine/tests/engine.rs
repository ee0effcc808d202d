//! The engine against the real test model (SmolLM2-135M-Instruct Q4_1).
//!
//! The model is found at `$HYPHA_TEST_MODEL`, else in the model cache
//! (`hypha model pull default` or `.ci/run` puts it there). Each test uses
//! one decode thread and small contexts so several can run side by side.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hypha_engine::{
    ChatMessage, Engine, EngineConfig, Error, Event, FinishReason, GenerateRequest, SamplingParams,
};

fn test_model() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPHA_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var_os("HYPHA_MODELS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hypha/models")))
        .expect("HOME or HYPHA_MODELS_DIR must be set");
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "test model missing at {}: run `hypha model pull default` or .ci/run",
        p.display()
    );
    p
}

fn engine(parallel: u32, ctx: u32, queue: usize) -> Engine {
    let mut cfg = EngineConfig::new(test_model());
    cfg.parallel = parallel;
    cfg.ctx_per_slot = ctx;
    cfg.threads = 1;
    cfg.queue_max = queue;
    Engine::start(cfg).expect("engine starts")
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

fn chat_prompt(e: &Engine, user: &str) -> Vec<i32> {
    let text = e
        .apply_chat_template(&[ChatMessage {
            role: "user".into(),
            content: user.into(),
        }])
        .unwrap();
    e.tokenize(&text).unwrap()
}

struct Output {
    text: String,
    pieces: Vec<String>,
    ids: Vec<i32>,
    finish: hypha_engine::Finish,
}

fn run(e: &Engine, req: GenerateRequest) -> Output {
    let mut g = e.submit(req).expect("submitted");
    let (mut text, mut pieces, mut ids) = (String::new(), Vec::new(), Vec::new());
    loop {
        match g.blocking_next().expect("stream ends with Done") {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
                pieces.push(t);
            }
            Event::Done { text: t, finish } => {
                text.push_str(&t);
                return Output {
                    text,
                    pieces,
                    ids,
                    finish,
                };
            }
            Event::Failed(err) => panic!("generation failed: {err}"),
        }
    }
}

fn req(prompt: Vec<i32>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: greedy(),
        max_tokens: Some(max_tokens),
        stop: Vec::new(),
        grammar: None,
        logprobs: None,
        priority: 0,
        preemptible: false,
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn metadata_and_chat_template() {
    let e = engine(2, 512, 4);
    let info = e.info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.n_ctx_train, 8192);
    assert_eq!(info.ctx_per_slot, 512);
    assert_eq!(info.name, "SmolLM2-135M-Instruct.Q4_1");
    assert!(info
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));
    let text = e
        .apply_chat_template(&[
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ])
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn greedy_answers_and_is_repeatable() {
    let e = engine(2, 512, 4);
    let p = chat_prompt(&e, "What is the capital of France?");
    let a = run(&e, req(p.clone(), 24));
    assert_eq!(e.stats().prompt_tokens_reused.load(Ordering::Relaxed), 0);
    // The second run finds the first one's prompt in the slot's cache.
    let b = run(&e, req(p.clone(), 24));
    assert_eq!(
        e.stats().prompt_tokens_reused.load(Ordering::Relaxed) as usize,
        p.len() - 1
    );
    assert!(a.text.contains("Paris"), "unexpected answer {:?}", a.text);
    assert_eq!(a.text, b.text);
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.finish.prompt_tokens as usize, p.len());
    // Every generated token is an event, the end token included.
    assert_eq!(a.finish.completion_tokens as usize, a.ids.len());
}

#[test]
fn a_conversation_reuses_its_earlier_turns() {
    let e = engine(2, 1024, 4);
    let turn = |history: &[ChatMessage]| {
        e.tokenize(&e.apply_chat_template(history).unwrap())
            .unwrap()
    };
    let mut history = vec![ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let first = run(&e, req(turn(&history), 16));
    history.push(ChatMessage {
        role: "assistant".into(),
        content: first.text.clone(),
    });
    history.push(ChatMessage {
        role: "user".into(),
        content: "And of Italy?".into(),
    });
    let second_prompt = turn(&history);
    let before = e.stats().prompt_tokens_reused.load(Ordering::Relaxed);
    let second = run(&e, req(second_prompt.clone(), 16));
    let reused = e.stats().prompt_tokens_reused.load(Ordering::Relaxed) - before;
    // At least the whole first prompt is reused, not recomputed.
    assert!(
        reused as usize >= turn(&history[..1]).len() - 1,
        "reused only {reused}"
    );
    // And the answer is what a fresh engine gives.
    let fresh = engine(1, 1024, 4);
    assert_eq!(second.ids, run(&fresh, req(second_prompt, 16)).ids);
}

#[test]
fn max_tokens_ends_with_length() {
    let e = engine(1, 512, 4);
    let p = chat_prompt(&e, "Write a long poem about the sea.");
    let out = run(&e, req(p, 5));
    assert_eq!(out.finish.reason, FinishReason::Length);
    assert_eq!(out.finish.completion_tokens, 5);
    assert_eq!(out.ids.len(), 5);
}

#[test]
fn eight_concurrent_streams_equal_each_alone() {
    let e = engine(8, 512, 16);
    let questions = [
        "What is the capital of France?",
        "Name three colours.",
        "What is 2 + 2?",
        "Write a haiku about rain.",
        "Who wrote Hamlet?",
        "What do bees make?",
        "Say hello in Spanish.",
        "What is the largest planet?",
    ];
    let prompts: Vec<_> = questions.iter().map(|q| chat_prompt(&e, q)).collect();
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| run(&e, req(p.clone(), 32)).ids)
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let e = e.clone();
            let p = p.clone();
            std::thread::spawn(move || run(&e, req(p, 32)).ids)
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.join().unwrap(),
            alone[i],
            "stream {i} differs from its solo run"
        );
    }
}

#[test]
fn same_seed_same_output() {
    let e = engine(2, 512, 4);
    let p = chat_prompt(&e, "Tell me a story about a dragon.");
    let sampled = |seed| {
        let mut r = req(p.clone(), 24);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        run(&e, r).ids
    };
    let a = sampled(42);
    assert_eq!(a, sampled(42));
    let others = [sampled(1), sampled(2), sampled(3)];
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds never changed the output"
    );
}

#[test]
fn stop_string_across_token_boundary_is_not_emitted() {
    let e = engine(1, 512, 4);
    let p = chat_prompt(&e, "What is the capital of France?");
    let base = run(&e, req(p.clone(), 24));
    // Pick a stop string that starts inside one token's text and ends inside
    // the next, so it can only be found across the boundary.
    let (i, _) = base
        .pieces
        .iter()
        .enumerate()
        .skip(1)
        .find(|(i, t)| t.chars().count() >= 2 && base.pieces[i + 1].chars().count() >= 2)
        .expect("two adjacent multi-character pieces");
    let tail: String = base.pieces[i].chars().skip(1).collect();
    let head: String = base.pieces[i + 1].chars().take(1).collect();
    let stop = format!("{tail}{head}");
    let expected = &base.text[..base.text.find(&stop).unwrap()];
    let mut r = req(p, 24);
    r.stop = vec![stop.clone()];
    let out = run(&e, r);
    assert_eq!(out.finish.reason, FinishReason::Stop);
    assert_eq!(out.text, expected, "stop string {stop:?}");
    assert!(!out.text.contains(&stop));
}

#[test]
fn long_prompt_is_chunked_around_running_streams_and_changes_nothing() {
    let story = "The lighthouse keeper climbed the stairs every evening. ".repeat(60);
    let long_question = format!("{story}\nSummarise this in one sentence.");
    let mut cfg = EngineConfig::new(test_model());
    cfg.parallel = 2;
    cfg.ctx_per_slot = 1024;
    cfg.threads = 1;
    cfg.prompt_chunk_tokens = 64;
    let solo = Engine::start(cfg.clone()).unwrap();
    let long = chat_prompt(&solo, &long_question);
    assert!(long.len() > 500, "prompt should span several chunks");
    let expected = run(&solo, req(long.clone(), 16)).ids;
    drop(solo);

    let e = Engine::start(cfg).unwrap();
    let mut running = e
        .submit(req(
            chat_prompt(&e, "Write a long essay about the sea."),
            200,
        ))
        .unwrap();
    assert!(matches!(running.blocking_next(), Some(Event::Token { .. })));
    let times = std::thread::spawn(move || {
        let mut times = Vec::new();
        while let Some(ev) = running.blocking_next() {
            if matches!(ev, Event::Token { .. }) {
                times.push(Instant::now());
            }
        }
        times
    });
    let submitted = Instant::now();
    let mut g = e.submit(req(long, 16)).unwrap();
    let mut ids = Vec::new();
    let mut first_at = None;
    loop {
        match g.blocking_next().unwrap() {
            Event::Token { id, .. } => {
                first_at.get_or_insert_with(Instant::now);
                ids.push(id);
            }
            Event::Done { .. } => break,
            Event::Failed(err) => panic!("{err}"),
        }
    }
    assert_eq!(ids, expected, "chunked prompt changed the output");
    let first_at = first_at.unwrap();
    let during = times
        .join()
        .unwrap()
        .into_iter()
        .filter(|t| *t > submitted && *t < first_at)
        .count();
    // About one chunk per step: the running stream keeps getting tokens
    // while the long prompt is read.
    assert!(
        during >= 5,
        "running stream got only {during} tokens during the long prompt"
    );
}

#[test]
fn dropped_stream_frees_its_slot() {
    let e = engine(1, 512, 4);
    let p = chat_prompt(&e, "Write a very long essay about history.");
    let mut g = e.submit(req(p.clone(), 400)).unwrap();
    for _ in 0..3 {
        assert!(matches!(g.blocking_next(), Some(Event::Token { .. })));
    }
    assert_eq!(e.stats().slots_busy.load(Ordering::Acquire), 1);
    drop(g);
    wait_until("the slot to be freed", || {
        e.stats().slots_busy.load(Ordering::Acquire) == 0
    });
    // The freed slot serves the next request from a clean state.
    let fresh = engine(1, 512, 4);
    let expected = run(&fresh, req(p.clone(), 8)).ids;
    assert_eq!(run(&e, req(p, 8)).ids, expected);
}

#[test]
fn full_queue_is_refused_and_waiting_requests_run_later() {
    let e = engine(1, 512, 1);
    let p = chat_prompt(&e, "Count from one to one hundred.");
    let mut first = e.submit(req(p.clone(), 64)).unwrap();
    assert!(matches!(first.blocking_next(), Some(Event::Token { .. })));
    let waiting = e.submit(req(p.clone(), 4)).unwrap();
    match e.submit(req(p.clone(), 4)) {
        Err(Error::QueueFull { queued: 1 }) => {}
        Err(other) => panic!("expected QueueFull, got {other}"),
        Ok(_) => panic!("expected QueueFull, got a generation"),
    }
    drop(first);
    let mut waiting = waiting;
    let mut tokens = 0;
    loop {
        match waiting.blocking_next().unwrap() {
            Event::Token { .. } => tokens += 1,
            Event::Done { finish, .. } => {
                assert_eq!(finish.completion_tokens, 4);
                break;
            }
            Event::Failed(err) => panic!("{err}"),
        }
    }
    assert_eq!(tokens, 4);
}

#[test]
fn waiting_requests_are_admitted_by_priority() {
    let e = engine(1, 512, 4);
    let p = chat_prompt(&e, "Count from one to one hundred.");
    let mut first = e.submit(req(p.clone(), 64)).unwrap();
    assert!(matches!(first.blocking_next(), Some(Event::Token { .. })));
    // Queued in this order: low, high, low2 (same priority as low).
    let low = e.submit(req(p.clone(), 4)).unwrap();
    let high = e
        .submit(GenerateRequest {
            priority: 10,
            ..req(p.clone(), 4)
        })
        .unwrap();
    let low2 = e.submit(req(p.clone(), 4)).unwrap();
    let first_token_at = |mut g: hypha_engine::Generation| {
        std::thread::spawn(move || loop {
            match g.blocking_next() {
                Some(Event::Token { .. }) => return Instant::now(),
                Some(Event::Failed(e)) => panic!("{e}"),
                _ => {}
            }
        })
    };
    let (low, high, low2) = (
        first_token_at(low),
        first_token_at(high),
        first_token_at(low2),
    );
    drop(first);
    let (low, high, low2) = (
        low.join().unwrap(),
        high.join().unwrap(),
        low2.join().unwrap(),
    );
    assert!(high < low, "the higher priority runs first");
    assert!(low < low2, "equals keep their arrival order");
}

/// Ends a stream, returning how it ended: `Ok(tokens)` at `Done`.
fn drain(mut g: hypha_engine::Generation) -> Result<usize, hypha_engine::Error> {
    let mut tokens = 0;
    loop {
        match g.blocking_next().expect("stream ends") {
            Event::Token { .. } => tokens += 1,
            Event::Done { .. } => return Ok(tokens),
            Event::Failed(e) => return Err(e),
        }
    }
}

#[test]
fn a_request_that_is_not_preemptible_stops_a_preemptible_one_for_its_slot() {
    let e = engine(1, 512, 4);
    let p = chat_prompt(&e, "Count from one to one hundred.");
    let free = |max_tokens, priority| GenerateRequest {
        preemptible: true,
        priority,
        ..req(p.clone(), max_tokens)
    };
    let mut running = e.submit(free(200, 0)).unwrap();
    assert!(matches!(running.blocking_next(), Some(Event::Token { .. })));
    // Another preemptible request, even of higher priority, waits.
    let waiting = e.submit(free(4, 5)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.stats().preempted.load(Ordering::Relaxed), 0);
    assert_eq!(e.stats().queued.load(Ordering::Relaxed), 1);
    // One that is not preemptible takes the slot at once, and the
    // preemptible one that waited runs after it.
    let paying = e.submit(req(p.clone(), 4)).unwrap();
    let (paying, waiting) = (
        std::thread::spawn(move || drain(paying)),
        std::thread::spawn(move || drain(waiting)),
    );
    match drain(running) {
        Err(hypha_engine::Error::Preempted) => {}
        other => panic!("the running preemptible request was not preempted: {other:?}"),
    }
    assert_eq!(paying.join().unwrap().unwrap(), 4);
    assert_eq!(waiting.join().unwrap().unwrap(), 4);
    assert_eq!(e.stats().preempted.load(Ordering::Relaxed), 1);
    // With a slot free, nothing is preempted.
    let alone = e.submit(req(p, 4)).unwrap();
    assert_eq!(drain(alone).unwrap(), 4);
    assert_eq!(e.stats().preempted.load(Ordering::Relaxed), 1);
}

#[test]
fn prompt_longer_than_context_is_refused() {
    // llama.cpp rounds contexts up to a multiple of 256.
    let e = engine(1, 256, 4);
    let ctx = e.info().ctx_per_slot;
    assert_eq!(ctx, 256);
    let p = e.tokenize(&"word ".repeat(300)).unwrap();
    match e.submit(req(p, 4)) {
        Err(Error::ContextExceeded {
            prompt_tokens,
            max_tokens: 256,
        }) => assert!(prompt_tokens >= 256),
        Err(other) => panic!("expected ContextExceeded, got {other}"),
        Ok(_) => panic!("expected ContextExceeded, got a generation"),
    }
    // Generation stops at the context's end with `length`.
    let p = e.tokenize(&"word ".repeat(100)).unwrap();
    let n = p.len() as u32;
    let out = run(&e, req(p, 1000));
    assert_eq!(out.finish.reason, FinishReason::Length);
    assert_eq!(out.finish.completion_tokens, ctx - n);
}

#[test]
fn bad_requests_are_refused() {
    let e = engine(1, 256, 4);
    let p = chat_prompt(&e, "Hi");
    let mut r = req(p.clone(), 4);
    r.sampling.temperature = -1.0;
    assert!(matches!(e.submit(r), Err(Error::InvalidRequest(_))));
    let mut r = req(p.clone(), 4);
    r.prompt = vec![i32::MAX];
    assert!(matches!(e.submit(r), Err(Error::InvalidRequest(_))));
    assert!(matches!(
        e.submit(req(Vec::new(), 4)),
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        e.submit(req(p.clone(), 0)),
        Err(Error::InvalidRequest(_))
    ));
    assert!(e.apply_chat_template(&[]).is_err());
    // Still serving.
    assert_eq!(run(&e, req(p, 3)).finish.completion_tokens, 3);
}

#[test]
fn missing_and_corrupt_models_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("hypha-engine-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("nope.gguf");
    let err = Engine::start(EngineConfig::new(&missing)).err().unwrap();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err}");

    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model at all").unwrap();
    let err = Engine::start(EngineConfig::new(&garbage)).err().unwrap();
    assert!(err.to_string().contains("not a GGUF file"), "{err}");

    // A real model cut short: the header parses, the tensor data is missing.
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(test_model()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = Engine::start(EngineConfig::new(&truncated)).err().unwrap();
    assert!(matches!(err, Error::ModelLoad { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shared_prompt_prefixes_are_copied_and_change_nothing() {
    let system = "You are a careful assistant for a lighthouse museum. Answer visitors' questions \
                  about lighthouses, ships and the sea in one or two friendly sentences.";
    let questions = [
        "What is a lighthouse?",
        "Why are lighthouses tall?",
        "What is a fog horn?",
        "What is a lighthouse?",
    ];
    let prompt = |e: &Engine, q: &str| {
        let text = e
            .apply_chat_template(&[
                ChatMessage {
                    role: "system".into(),
                    content: system.into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: q.into(),
                },
            ])
            .unwrap();
        e.tokenize(&text).unwrap()
    };
    // Alone: one slot, one request at a time.
    let solo = engine(1, 512, 8);
    let alone: Vec<_> = questions
        .iter()
        .map(|q| run(&solo, req(prompt(&solo, q), 24)).ids)
        .collect();

    let e = engine(4, 512, 8);
    let prompts: Vec<_> = questions.iter().map(|q| prompt(&e, q)).collect();
    // Submit all before reading, so they are admitted together.
    let mut gens: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(req(p.clone(), 24)).unwrap())
        .collect();
    let together: Vec<Vec<i32>> = gens
        .iter_mut()
        .map(|g| {
            let mut ids = Vec::new();
            loop {
                match g.blocking_next().unwrap() {
                    Event::Token { id, .. } => ids.push(id),
                    Event::Done { .. } => return ids,
                    Event::Failed(err) => panic!("{err}"),
                }
            }
        })
        .collect();
    assert_eq!(together, alone);
    let reused = e.stats().prompt_tokens_reused.load(Ordering::Relaxed) as usize;
    let shared = prompts[0]
        .iter()
        .zip(&prompts[1])
        .take_while(|(a, b)| a == b)
        .count();
    // Three prompts copy at least the shared system prompt; the repeated
    // question copies all but its last token.
    assert!(
        reused >= 2 * shared + prompts[3].len() - 1,
        "reused {reused} tokens; shared prefix is {shared}"
    );
}

#[test]
fn devices_are_listed_and_a_missing_gpu_is_a_clear_error() {
    let devices = hypha_engine::list_devices(&[]).unwrap();
    assert!(
        devices
            .iter()
            .any(|d| d.kind == hypha_engine::DeviceKind::Cpu),
        "no CPU device in {devices:?}"
    );
    let has_cuda = devices
        .iter()
        .any(|d| d.backend.to_ascii_lowercase().starts_with("cuda"));
    let mut cfg = EngineConfig::new(test_model());
    cfg.parallel = 1;
    cfg.ctx_per_slot = 256;
    cfg.threads = 1;
    cfg.device = "cuda".parse().unwrap();
    match Engine::start(cfg.clone()) {
        Ok(e) => assert!(
            has_cuda && e.info().device.starts_with("CUDA"),
            "{}",
            e.info().device
        ),
        Err(Error::DeviceUnavailable { wanted, found }) => {
            assert!(!has_cuda);
            assert_eq!(wanted, "cuda");
            assert!(found.contains("CPU"), "{found}");
        }
        Err(other) => panic!("unexpected error {other}"),
    }
    // auto falls back to the CPU when there is no GPU, and says so.
    cfg.device = "auto".parse().unwrap();
    let e = Engine::start(cfg).unwrap();
    let gpu = devices.iter().any(|d| {
        matches!(
            d.kind,
            hypha_engine::DeviceKind::Gpu | hypha_engine::DeviceKind::IntegratedGpu
        )
    });
    assert_eq!(
        e.info().device.starts_with("CPU"),
        !gpu,
        "{}",
        e.info().device
    );
    assert!("quantum".parse::<hypha_engine::DeviceChoice>().is_err());
}

#[test]
fn logprobs_are_the_models_and_a_grammar_holds_the_text() {
    let e = engine(1, 512, 4);
    let p = chat_prompt(&e, "Name a colour.");
    // Greedy picks the likeliest token: its logprob is the top one's.
    let mut g = e
        .submit(GenerateRequest {
            logprobs: Some(3),
            ..req(p.clone(), 6)
        })
        .unwrap();
    let mut n = 0;
    while let Some(ev) = g.blocking_next() {
        match ev {
            Event::Token { logprob, .. } => {
                let lp = logprob.expect("asked for");
                assert_eq!(lp.top.len(), 3);
                assert!(lp.logprob <= 0.0 && lp.logprob.is_finite());
                assert_eq!(lp.top[0].1, lp.logprob, "{lp:?}");
                assert_eq!(lp.top[0].0, lp.bytes);
                assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{lp:?}");
                let mass: f32 = lp.top.iter().map(|(_, l)| l.exp()).sum();
                assert!(mass <= 1.0001, "{mass}");
                n += 1;
            }
            Event::Done { .. } => break,
            Event::Failed(err) => panic!("{err}"),
        }
    }
    assert_eq!(n, 6);
    assert!(e
        .submit(GenerateRequest {
            logprobs: Some(hypha_engine::MAX_TOP_LOGPROBS + 1),
            ..req(p.clone(), 2)
        })
        .is_err());

    // A grammar keeps sampled text within it, at any temperature.
    let grammar = hypha_engine::json_schema_to_grammar(
        r#"{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"],"additionalProperties":false}"#,
    )
    .unwrap();
    for seed in 0..3 {
        let out = run(
            &e,
            GenerateRequest {
                grammar: Some(hypha_engine::Grammar::whole(grammar.clone())),
                sampling: SamplingParams {
                    temperature: 1.5,
                    seed: Some(seed),
                    ..SamplingParams::default()
                },
                ..req(p.clone(), 64)
            },
        );
        assert_eq!(out.finish.reason, FinishReason::Stop, "{}", out.text);
        let compact: String = out.text.split_whitespace().collect();
        let digits = compact
            .strip_prefix("{\"n\":")
            .and_then(|r| r.strip_suffix('}'))
            .unwrap_or_else(|| panic!("{}", out.text));
        let digits = digits.strip_prefix('-').unwrap_or(digits);
        assert!(
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
            "{}",
            out.text
        );
    }
    assert!(hypha_engine::json_schema_to_grammar("{").is_err());
}
