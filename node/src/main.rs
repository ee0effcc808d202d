//! The `hypha` command line: a thin layer over the `hypha_node` library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hypha_engine::{DeviceChoice, EngineConfig, GpuLayers};
use hypha_node::net::addr::PeerAddr;
use hypha_node::{chat, models, Node, NodeConfig, DEFAULT_HTTP_ADDR};

#[derive(Parser)]
#[command(
    name = "hypha",
    version,
    about = "Peer-to-peer LLM inference with an OpenAI-compatible API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node: load a model and serve the OpenAI API; with --quic, serve
    /// it to peers; with --peer, send requests for other models to peers.
    Up(UpArgs),
    /// Start a two-node network on this machine (a seeder running the
    /// default model and a consumer without one, linked over QUIC), stream
    /// one chat completion through the consumer's API, then keep serving
    /// (or exit with --exit).
    Demo {
        #[command(flatten)]
        up: UpArgs,
        /// The question to ask.
        #[arg(
            long,
            default_value = "What is the capital of France? Answer in one sentence."
        )]
        ask: String,
        /// Stop after the completion instead of serving on.
        #[arg(long)]
        exit: bool,
    },
    /// Manage the model cache.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Chat in the terminal with a running node (or any OpenAI-compatible URL).
    Chat(ChatArgs),
    /// List the compute devices ggml can use.
    Devices,
    /// This node's credits and receipts, from its ledger.
    Ledger {
        #[command(subcommand)]
        cmd: LedgerCmd,
        /// Where the node keeps its key and ledger (default: $HYPHA_HOME or the XDG data directory).
        #[arg(long, env = "HYPHA_HOME", global = true)]
        data_dir: Option<PathBuf>,
    },
    /// Print this node's id (creating its key on first use).
    Id {
        /// Where the node keeps its key (default: $HYPHA_HOME or the XDG data directory).
        #[arg(long, env = "HYPHA_HOME")]
        data_dir: Option<PathBuf>,
    },
    /// A running node's state: model, slots, peers, and how the network
    /// sees it (NAT mapping, public address, candidates).
    Status {
        /// Base URL of the node's API.
        #[arg(long, default_value = "http://127.0.0.1:8420")]
        url: String,
        #[arg(long, env = "HYPHA_API_KEY")]
        api_key: Option<String>,
    },
    /// Show a running node's view of the network: its DHT routing table,
    /// connections, provider records and the models on offer.
    Peers {
        /// Base URL of the node's API.
        #[arg(long, default_value = "http://127.0.0.1:8420")]
        url: String,
        #[arg(long, env = "HYPHA_API_KEY")]
        api_key: Option<String>,
        /// Print the raw JSON of GET /v1/network.
        #[arg(long)]
        json: bool,
    },
    /// Measure time to first token, inter-token latency and tokens/s of any
    /// OpenAI-compatible server at several concurrencies.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8420")]
    url: String,
    /// Model name (default: the first the server lists).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, env = "HYPHA_API_KEY")]
    api_key: Option<String>,
    /// Concurrency levels, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    concurrency: Vec<u32>,
    /// Requests per level.
    #[arg(long, default_value_t = 16)]
    requests: u32,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    #[arg(
        long,
        default_value = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    )]
    prompt: String,
    /// A JSON schema file: each level then runs plain chat and chat with
    /// this schema as `response_format`, alternately, `--rounds` times.
    #[arg(long)]
    json_schema: Option<PathBuf>,
    /// A JSON file of OpenAI `tools`: each level then also runs chat with
    /// these tools (`tool_choice: required`, one call), alternately with
    /// plain chat (and the schema runs), `--rounds` times.
    #[arg(long)]
    tools: Option<PathBuf>,
    /// Alternations of plain and schema (or tools) runs per level (with
    /// --json-schema or --tools).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
}

#[derive(clap::Args)]
struct UpArgs {
    /// `default`, a cached model's name, or a path to a GGUF file. Without
    /// it a node with --peer runs no model and only consumes; any other node
    /// runs `default`.
    #[arg(long)]
    model: Option<String>,
    /// Run no model: a node that only routes, answers the DHT and STUN
    /// (for example a bootstrap node).
    #[arg(long, conflicts_with = "model")]
    no_model: bool,
    /// Address for the HTTP API.
    #[arg(long, default_value = DEFAULT_HTTP_ADDR)]
    http: SocketAddr,
    /// Serve the model to peers over QUIC on this UDP address.
    #[arg(long)]
    quic: Option<SocketAddr>,
    /// A peer to send requests to, as NODE_ID@HOST:PORT (repeatable).
    #[arg(long = "peer")]
    peers: Vec<PeerAddr>,
    /// A node to join the network's DHT through, as NODE_ID@HOST:PORT
    /// (repeatable). Models are then found on any seeder of the network.
    #[arg(long = "bootstrap")]
    bootstrap: Vec<PeerAddr>,
    /// A STUN server to ask for this node's public address (repeatable);
    /// peers are asked anyway, on their QUIC ports.
    #[arg(long = "stun")]
    stun: Vec<SocketAddr>,
    /// The UDP address provider records give for this seeder (repeatable;
    /// default: the --quic address when it names an IP).
    #[arg(long = "advertise")]
    advertise: Vec<SocketAddr>,
    /// Relay for peers that cannot be reached directly: forward their
    /// end-to-end encrypted QUIC packets (this node never holds their
    /// keys), and say so in the DHT. Needs --quic on a reachable address.
    #[arg(long, requires = "quic")]
    relay: bool,
    /// Hold reservations only for these nodes, so only they can be reached
    /// through this relay (repeatable; default: any node).
    #[arg(long = "relay-allow", requires = "relay")]
    relay_allow: Vec<hypha_wire::NodeId>,
    /// Bytes per second relayed from one peer (what it sends, over all its
    /// paths through this relay).
    #[arg(long, default_value_t = hypha_node::services::relay_server::DEFAULT_RELAY_RATE, requires = "relay")]
    relay_rate: u64,
    /// Reservations held at once as a relay.
    #[arg(long, default_value_t = hypha_node::services::relay_server::MAX_RESERVATIONS, requires = "relay")]
    relay_max_reservations: usize,
    /// Append every byte relayed to this file (an audit: it holds only
    /// the ends' QUIC ciphertext).
    #[arg(long, requires = "relay")]
    relay_capture: Option<PathBuf>,
    /// Hold a reservation at this relay, as NODE_ID@HOST:PORT (repeatable),
    /// whatever the NAT looks like: for a node behind a firewall that
    /// peers cannot dial. Nodes behind a NAT find relays in the DHT anyway.
    #[arg(long = "relay-via")]
    relay_via: Vec<PeerAddr>,
    /// Where the node keeps its key (default: $HYPHA_HOME or the XDG data directory).
    #[arg(long, env = "HYPHA_HOME")]
    data_dir: Option<PathBuf>,
    /// Peers served at once; more are refused.
    #[arg(long, default_value_t = hypha_node::net::pool::MAX_PEERS)]
    max_peers: usize,
    /// Price a seeder publishes: micro-credits per prompt token.
    #[arg(long, default_value_t = hypha_node::DEFAULT_PRICE_PROMPT_MICRO)]
    price_prompt: u64,
    /// Price a seeder publishes: micro-credits per generated token.
    #[arg(long, default_value_t = hypha_node::DEFAULT_PRICE_COMPLETION_MICRO)]
    price_completion: u64,
    /// Most a consumer pays per prompt token, in micro-credits: providers
    /// asking more are not asked.
    #[arg(long, default_value_t = hypha_node::inference::remote::DEFAULT_MAX_PRICE_PROMPT_MICRO)]
    max_price_prompt: u64,
    /// Most a consumer pays per generated token, in micro-credits.
    #[arg(long, default_value_t = hypha_node::inference::remote::DEFAULT_MAX_PRICE_COMPLETION_MICRO)]
    max_price_completion: u64,
    /// Most one request may cost, in micro-credits (default: no cap): the
    /// seeder refuses a prompt that costs more and stops generating before
    /// the tokens would.
    #[arg(long)]
    max_request_credits: Option<u64>,
    /// Proof of work (leading zero bits) a new identity is ground with and
    /// every peer's identity must carry; all nodes of a network use one
    /// value.
    #[arg(long, default_value_t = hypha_ledger::DEFAULT_POW_BITS)]
    pow_bits: u32,
    /// Most generated tokens a consumer gets beyond its last countersigned
    /// receipt (cumulative receipts go out every half of it).
    #[arg(long, default_value_t = hypha_node::inference::serve::DEFAULT_RECEIPT_INTERVAL)]
    receipt_interval: u32,
    /// Requests a minute a consumer without standing here (the free tier)
    /// may make; 0 serves only consumers with standing.
    #[arg(long, default_value_t = hypha_node::inference::admission::DEFAULT_FREE_TIER_PER_MINUTE)]
    free_tier_per_minute: u32,
    /// Concurrent sequences (slots) in the engine.
    #[arg(long, default_value_t = hypha_engine::DEFAULT_PARALLEL)]
    parallel: u32,
    /// Context tokens per slot (0: 2048, capped by the model).
    #[arg(long, default_value_t = 0)]
    ctx_size: u32,
    /// Decode threads (default: all cores but one).
    #[arg(long)]
    threads: Option<u32>,
    /// auto, cpu, cuda, metal, rocm or vulkan.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Layers to offload to the GPU: auto (all) or a number.
    #[arg(long, default_value = "auto")]
    gpu_layers: GpuLayers,
    /// Requests that may wait for a slot before new ones get 503.
    #[arg(long, default_value_t = hypha_engine::DEFAULT_QUEUE_MAX)]
    queue: usize,
    /// Most tokens decoded in one step.
    #[arg(long, default_value_t = hypha_engine::DEFAULT_BATCH_TOKENS)]
    batch_size: u32,
    /// Prompt tokens per decode step while other streams are generating.
    #[arg(long, default_value_t = hypha_engine::DEFAULT_PROMPT_CHUNK_TOKENS)]
    prompt_chunk: u32,
    /// Also serve /v1/embeddings from the model (a second, one-sequence
    /// context of --ctx-size tokens).
    #[arg(long)]
    embeddings: bool,
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long, env = "HYPHA_API_KEY")]
    api_key: Option<String>,
    /// A web origin (`https://app.example`, or `*`) whose pages may call
    /// the API from a browser; others are refused (repeatable).
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// A DNS name the node answers to besides `localhost` and IP addresses
    /// (repeatable); requests naming any other host are refused.
    #[arg(long = "allow-host")]
    allowed_hosts: Vec<String>,
    /// HTTP client connections served at once; more get a 503 and are
    /// closed.
    #[arg(long, default_value_t = hypha_node::api::conns::DEFAULT_MAX_HTTP_CONNECTIONS)]
    max_http_connections: usize,
    /// Completions (chat or text, streaming or not) in flight at once;
    /// more get a 503 at once.
    #[arg(long, default_value_t = hypha_node::api::conns::DEFAULT_MAX_HTTP_STREAMS)]
    max_http_streams: usize,
    /// Answer `/health` without the API key (for probes); `/metrics` and
    /// everything else still need it when one is set.
    #[arg(long)]
    public_health: bool,
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// earned - spent, in micro-credits.
    Balance,
    /// The newest receipts, newest first.
    Receipts {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Check the whole log: checksums, the hash chain and every signature.
    Verify,
    /// Every receipt as one JSON object per line.
    Export,
    /// Another node's balance, from the receipts the network's DHT holds
    /// for it (each checked), asked of a running node.
    Peer {
        /// The node's id.
        node_id: String,
        /// Base URL of a running node's API.
        #[arg(long, default_value = "http://127.0.0.1:8420")]
        url: String,
        #[arg(long, env = "HYPHA_API_KEY")]
        api_key: Option<String>,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Fetch `default` or a GGUF from an http(s) URL into the cache.
    Pull {
        /// `default` or a URL.
        source: String,
        /// Expected sha256 of the file (hex).
        #[arg(long)]
        sha256: Option<String>,
        /// File name in the cache (default: from the URL).
        #[arg(long)]
        name: Option<String>,
    },
    /// List cached models.
    List,
}

#[derive(clap::Args)]
struct ChatArgs {
    /// Base URL of the node.
    #[arg(long, default_value = "http://127.0.0.1:8420")]
    url: String,
    /// Model to use (default: the first the server lists).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, env = "HYPHA_API_KEY")]
    api_key: Option<String>,
    #[arg(long)]
    max_tokens: Option<u32>,
    #[arg(long)]
    temperature: Option<f32>,
    /// A system prompt to start the conversation with.
    #[arg(long)]
    system: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HYPHA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hypha-io")
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Up(a) => {
            let node = start_node(a).await?;
            serve(node).await
        }
        Cmd::Demo { up, ask, exit } => {
            let (seeder, consumer) = start_demo_network(up).await?;
            let shown = demo(&seeder, &consumer, &ask).await;
            if exit || shown.is_err() {
                consumer.stop().await?;
                seeder.stop().await?;
                return shown;
            }
            eprintln!(
                "\nhypha: both nodes keep serving; point any OpenAI client at http://{}/v1 (Ctrl-C stops them)",
                consumer.http_addr()
            );
            let served = serve(consumer).await;
            seeder.stop().await?;
            served
        }
        Cmd::Model { cmd } => match cmd {
            ModelCmd::Pull {
                source,
                sha256,
                name,
            } => {
                let path = if source == "default" {
                    models::pull_default().await?
                } else {
                    models::pull_url(
                        &source,
                        models::PullOptions {
                            sha256,
                            name,
                            progress: true,
                        },
                    )
                    .await?
                };
                println!("{}", path.display());
                Ok(())
            }
            ModelCmd::List => {
                let dir = models::cache_dir()?;
                println!("cache: {}", dir.display());
                for m in models::list()? {
                    println!("{:<48} {:>10.1} MB", m.name, m.size_bytes as f64 / 1e6);
                }
                Ok(())
            }
        },
        Cmd::Chat(a) => {
            chat::run(chat::ChatOptions {
                url: a.url,
                model: a.model,
                api_key: a.api_key,
                max_tokens: a.max_tokens,
                temperature: a.temperature,
                system: a.system,
            })
            .await
        }
        Cmd::Bench(a) => {
            hypha_node::install_crypto_provider();
            let client = hypha_node::models::http_client()?;
            let model = match a.model {
                Some(m) => m,
                None => hypha_bench::first_model(&client, &a.url).await?,
            };
            let cfg = hypha_bench::BenchConfig {
                url: a.url,
                model,
                api_key: a.api_key,
                prompt: a.prompt,
                max_tokens: a.max_tokens,
                requests: a.requests,
                concurrency: a.concurrency,
                response_format: None,
                tools: None,
                label: "plain".into(),
            };
            println!(
                "hypha bench: {} model {} ({} requests per level, {} max tokens, greedy)",
                cfg.url, cfg.model, cfg.requests, cfg.max_tokens
            );
            let read_json = |path: &PathBuf| -> anyhow::Result<serde_json::Value> {
                serde_json::from_slice(
                    &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                )
                .with_context(|| format!("{} is not JSON", path.display()))
            };
            let mut variants = vec![cfg.clone()];
            if let Some(path) = &a.json_schema {
                let schema = read_json(path)?;
                variants.push(hypha_bench::BenchConfig {
                    response_format: Some(serde_json::json!({"type": "json_schema",
                        "json_schema": {"name": "bench", "strict": true, "schema": schema}})),
                    label: "json_schema".into(),
                    ..cfg.clone()
                });
            }
            if let Some(path) = &a.tools {
                variants.push(hypha_bench::BenchConfig {
                    tools: Some(read_json(path)?),
                    label: "tools".into(),
                    ..cfg.clone()
                });
            }
            if variants.len() == 1 {
                let reports = hypha_bench::run(&client, &cfg).await;
                print!("{}", hypha_bench::format_table(&reports));
                return Ok(());
            }
            let mut reports = Vec::new();
            for &c in &cfg.concurrency {
                for _ in 0..a.rounds.max(1) {
                    for v in &variants {
                        reports.push(hypha_bench::run_level(&client, v, c).await);
                    }
                }
            }
            print!("{}", hypha_bench::format_table(&reports));
            Ok(())
        }
        Cmd::Ledger {
            cmd:
                LedgerCmd::Peer {
                    node_id,
                    url,
                    api_key,
                },
            ..
        } => peer_balance_cmd(&node_id, &url, api_key).await,
        Cmd::Ledger { cmd, data_dir } => ledger_cmd(cmd, data_dir.as_deref()),
        Cmd::Peers { url, api_key, json } => peers_cmd(&url, api_key, json).await,
        Cmd::Status { url, api_key } => status_cmd(&url, api_key).await,
        Cmd::Id { data_dir } => {
            let dir = hypha_node::identity::data_dir(data_dir.as_deref())?;
            let ident = hypha_node::identity::Identity::load_or_create(&dir)?;
            println!("{}", ident.id());
            Ok(())
        }
        Cmd::Devices => {
            for d in hypha_engine::list_devices(&[])? {
                println!(
                    "{:<10} {:<8} {:?} {} ({} MiB total)",
                    d.name,
                    d.backend,
                    d.kind,
                    d.description,
                    d.memory_total_bytes >> 20
                );
            }
            Ok(())
        }
    }
}

fn engine_config(a: &UpArgs, model_path: PathBuf) -> EngineConfig {
    let mut engine = EngineConfig::new(model_path);
    engine.parallel = a.parallel;
    engine.ctx_per_slot = a.ctx_size;
    if let Some(t) = a.threads {
        engine.threads = t;
    }
    engine.device = a.device;
    engine.gpu_layers = a.gpu_layers;
    engine.queue_max = a.queue;
    engine.batch_tokens = a.batch_size;
    engine.prompt_chunk_tokens = a.prompt_chunk;
    engine.embeddings = a.embeddings;
    engine
}

async fn load_model(spec: &str, a: &UpArgs) -> anyhow::Result<(EngineConfig, Vec<String>)> {
    let model_path: PathBuf = hypha_node::resolve_model(spec)
        .await
        .with_context(|| format!("cannot find model {spec:?}"))?;
    let aliases = if spec == "default" {
        vec!["default".to_owned()]
    } else {
        Vec::new()
    };
    Ok((engine_config(a, model_path), aliases))
}

async fn start_node(a: UpArgs) -> anyhow::Result<Node> {
    let spec = match (&a.model, a.peers.is_empty() && a.bootstrap.is_empty()) {
        _ if a.no_model => None,
        (Some(m), _) => Some(m.clone()),
        (None, true) => Some("default".to_owned()),
        (None, false) => None,
    };
    let (engine, aliases) = match &spec {
        Some(spec) => {
            let (e, al) = load_model(spec, &a).await?;
            (Some(e), al)
        }
        None => (None, Vec::new()),
    };
    let mut cfg = NodeConfig::new(engine);
    cfg.http_addr = a.http;
    cfg.api_key = a.api_key;
    cfg.cors_origins = a.cors_origins;
    cfg.allowed_hosts = a.allowed_hosts;
    cfg.max_http_connections = a.max_http_connections;
    cfg.max_http_streams = a.max_http_streams;
    cfg.public_health = a.public_health;
    cfg.model_aliases = aliases;
    cfg.quic_addr = a.quic;
    cfg.peers = a.peers;
    cfg.bootstrap = a.bootstrap;
    cfg.advertise = a.advertise;
    cfg.stun_servers = a.stun;
    cfg.data_dir = a.data_dir;
    cfg.max_peers = a.max_peers;
    cfg.price_prompt_micro = a.price_prompt;
    cfg.price_completion_micro = a.price_completion;
    cfg.spend = hypha_node::inference::remote::SpendLimits {
        max_price_prompt_micro: Some(a.max_price_prompt),
        max_price_completion_micro: Some(a.max_price_completion),
        max_request_credits: a.max_request_credits,
    };
    cfg.receipt_interval = a.receipt_interval;
    cfg.free_tier_per_minute = a.free_tier_per_minute;
    cfg.pow_bits = a.pow_bits;
    cfg.relay = a
        .relay
        .then(|| hypha_node::services::relay_server::RelayConfig {
            allow: a.relay_allow,
            max_reservations: a.relay_max_reservations,
            bytes_per_second_per_peer: a.relay_rate,
            capture: a.relay_capture,
            ..Default::default()
        });
    cfg.relay_via = a.relay_via;
    let node = Node::start(cfg).await?;
    match node.engine() {
        Some(engine) => {
            let info = engine.info();
            eprintln!(
                "hypha: serving {} on {} at http://{}/v1",
                info.name,
                info.device,
                node.http_addr()
            );
        }
        None => eprintln!(
            "hypha: no local model; requests go to peers; API at http://{}/v1",
            node.http_addr()
        ),
    }
    if let Some(p) = node.peer_addr() {
        if a.quic.is_some() {
            eprintln!("hypha: peers reach this node as {p}");
        }
    }
    Ok(node)
}

/// A seeder running the model with its own identity in a subfolder of the
/// data directory, and a consumer on the requested HTTP address that has no
/// model and reaches the seeder over QUIC on loopback.
async fn start_demo_network(a: UpArgs) -> anyhow::Result<(Node, Node)> {
    let spec = a.model.clone().unwrap_or_else(|| "default".to_owned());
    let (engine, aliases) = load_model(&spec, &a).await?;
    let data = hypha_node::identity::data_dir(a.data_dir.as_deref())?;
    let mut cfg = NodeConfig::new(Some(engine));
    cfg.api_key = a.api_key.clone();
    cfg.model_aliases = aliases;
    cfg.quic_addr = Some(
        a.quic
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
    );
    cfg.data_dir = Some(data.join("demo-seeder"));
    let seeder = Node::start(cfg).await?;
    let seeder_addr = seeder
        .peer_addr()
        .context("the seeder has no QUIC address")?;
    // The consumer knows the seeder only as the node it joins the DHT
    // through: it finds the model's provider by looking it up.
    let mut cfg = NodeConfig::new(None);
    cfg.http_addr = a.http;
    cfg.api_key = a.api_key;
    cfg.bootstrap = vec![seeder_addr.clone()];
    cfg.data_dir = Some(data);
    let consumer = Node::start(cfg).await?;
    let info = seeder.engine().map(|e| e.info().clone());
    if let Some(info) = info {
        eprintln!(
            "hypha: seeder {} serves {} on {} (QUIC {}, its own API at http://{}/v1)",
            seeder_addr.id,
            info.name,
            info.device,
            seeder_addr.addr,
            seeder.http_addr()
        );
    }
    eprintln!(
        "hypha: consumer {} has no model; its API at http://{}/v1 finds the seeder through the DHT",
        consumer.id().map(|i| i.to_string()).unwrap_or_default(),
        consumer.http_addr()
    );
    Ok((seeder, consumer))
}

async fn serve(node: Node) -> anyhow::Result<()> {
    node.run_until(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("hypha: shutting down");
    })
    .await
}

/// Sends one streaming chat completion to the consumer's HTTP API, the way
/// any OpenAI client would; the seeder runs it. Reports what it measured.
async fn demo(seeder: &Node, consumer: &Node, ask: &str) -> anyhow::Result<()> {
    let client = models::http_client()?;
    let base = format!("http://{}", consumer.http_addr());
    let model = seeder
        .engine()
        .map(|e| e.info().name.clone())
        .context("the seeder runs no model")?;
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": ask}],
        "temperature": 0,
        "max_tokens": 128,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    println!("POST {base}/v1/chat/completions\n> {ask}");
    let started = std::time::Instant::now();
    let reply = chat::stream_to_stdout(&client, &base, None, &body).await?;
    println!();
    let completion = reply
        .usage
        .as_ref()
        .and_then(|u| u["completion_tokens"].as_u64())
        .unwrap_or(0);
    let prompt = reply
        .usage
        .as_ref()
        .and_then(|u| u["prompt_tokens"].as_u64())
        .unwrap_or(0);
    if let (Some(first), Some(last)) = (reply.first_text_at, reply.last_text_at) {
        let decode = (last - first).as_secs_f64();
        let rate = if decode > 0.0 && completion > 1 {
            format!("{:.0} tokens/s", (completion - 1) as f64 / decode)
        } else {
            "-".to_owned()
        };
        println!(
            "usage: {prompt} prompt + {completion} completion tokens; first token after {:.0} ms; decode {rate}",
            (first - started).as_secs_f64() * 1e3
        );
    }
    match &reply.served_by {
        Some(peer) => println!("served by seeder {peer} over QUIC"),
        None => anyhow::bail!("the consumer did not say which peer served the request"),
    }
    show_receipt(seeder, consumer).await
}

/// Prints the request's receipt as both ledgers hold it.
async fn show_receipt(seeder: &Node, consumer: &Node) -> anyhow::Result<()> {
    let (Some(cl), Some(sl)) = (consumer.ledger(), seeder.ledger()) else {
        anyhow::bail!("the demo nodes have no ledgers");
    };
    let receipt = cl
        .recent(1)
        .into_iter()
        .next()
        .context("the consumer recorded no receipt")?;
    // The seeder records it when the countersignature reaches it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sl.recent(1).first() != Some(&receipt) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the seeder did not record the receipt"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = &receipt.receipt;
    let short = |id: hypha_wire::NodeId| id.to_string()[..12].to_owned();
    println!(
        "receipt: request {} of consumer {}.. served by {}..: {} prompt + {} completion tokens = {} micro-credits; signed by both, in both ledgers",
        r.request_id,
        short(r.consumer),
        short(r.seeder),
        r.prompt_tokens,
        r.completion_tokens,
        r.credits
    );
    let me = r.consumer;
    println!(
        "consumer balance: {} micro-credits (spent {}); seeder earned {}",
        hypha_ledger::balance(&cl.totals(&me)),
        cl.totals(&me).spent,
        sl.totals(&r.seeder).earned
    );
    Ok(())
}

/// Reads the node's ledger (read-only: a running node may be appending).
/// `hypha ledger peer ID`: another node's balance as the DHT's receipts
/// show it.
async fn peer_balance_cmd(node_id: &str, url: &str, api_key: Option<String>) -> anyhow::Result<()> {
    let v = get_json(url, &format!("/v1/ledger/{node_id}"), api_key.as_deref()).await?;
    println!(
        "{}: balance {} micro-credits (earned {} - spent {}), from {} receipts found in the DHT, each signature checked; standing at this node {}",
        v["node_id"].as_str().unwrap_or(node_id),
        v["balance"],
        v["earned"],
        v["spent"],
        v["receipts"],
        v["standing_here"]
    );
    // Seeders that say it left a receipt unsigned; two or more refuse it.
    for n in v["unpaid_notices"].as_array().into_iter().flatten() {
        println!(
            "  unpaid notice: seeder {} says request {} left {} tokens unpaid",
            text(&n["seeder"]),
            n["request_id"],
            n["unpaid_tokens"]
        );
    }
    Ok(())
}

/// A JSON value as table text: strings bare, null as `-`.
fn text(x: &serde_json::Value) -> String {
    match x {
        serde_json::Value::String(t) => t.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// GETs `path` from a node's API as JSON, with a clear error.
async fn get_json(
    url: &str,
    path: &str,
    api_key: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    hypha_node::install_crypto_provider();
    let client = hypha_node::models::http_client()?;
    let mut req = client.get(format!("{}{path}", url.trim_end_matches('/')));
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("no node answers at {url}"))?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.context("the node's answer is not JSON")?;
    anyhow::ensure!(
        status.is_success(),
        "{url}{path} answered {status}: {}",
        v["error"]["message"].as_str().unwrap_or("no reason given")
    );
    Ok(v)
}

/// `hypha status`: the node, its slots and peers, and how the network sees
/// it.
async fn status_cmd(url: &str, api_key: Option<String>) -> anyhow::Result<()> {
    let health = get_json(url, "/health", api_key.as_deref()).await?;
    let s = text;
    println!(
        "model {}  slots {}/{} busy  queue {}",
        s(&health["model"]),
        s(&health["slots_busy"]),
        s(&health["slots_total"]),
        s(&health["queue_depth"])
    );
    let net = match get_json(url, "/v1/network", api_key.as_deref()).await {
        Ok(v) => v,
        Err(_) => {
            println!("not on a network (no --quic, --peer or --bootstrap)");
            return Ok(());
        }
    };
    println!("node {}  QUIC {}", s(&net["id"]), s(&net["quic_addr"]));
    let nat = &net["nat"];
    println!(
        "NAT mapping: {}  public address: {}",
        s(&nat["mapping"]),
        s(&nat["public_addr"])
    );
    let empty = Vec::new();
    for o in nat["observations"].as_array().unwrap_or(&empty) {
        println!("  peer {} saw us at {}", s(&o["peer"]), s(&o["saw"]));
    }
    let cands: Vec<String> = nat["candidates"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|c| format!("{} {}", s(&c["kind"]), s(&c["addr"])))
        .collect();
    println!("candidates: {}", cands.join(", "));
    println!(
        "routing table: {} contacts, {} connections",
        net["routing_table"].as_array().map_or(0, Vec::len),
        net["connections"].as_array().map_or(0, Vec::len)
    );
    let relay = &net["relay"];
    let reserved: Vec<String> = relay["reserved_at"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(s)
        .collect();
    if !reserved.is_empty() {
        println!("reachable through relays: {}", reserved.join(", "));
    }
    if relay["serving"].is_object() {
        let r = &relay["serving"];
        println!(
            "relaying: {} reservations, {} paths open, {} bytes forwarded",
            s(&r["reservations"]),
            s(&r["sessions"]),
            s(&r["forwarded_bytes"])
        );
    }
    Ok(())
}

/// `hypha peers`: prints `GET /v1/network` as tables.
async fn peers_cmd(url: &str, api_key: Option<String>, raw: bool) -> anyhow::Result<()> {
    let v = get_json(url, "/v1/network", api_key.as_deref()).await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = text;
    println!("node {} on QUIC {}", s(&v["id"]), s(&v["quic_addr"]));
    let empty = Vec::new();
    let table = v["routing_table"].as_array().unwrap_or(&empty);
    println!(
        "
routing table: {} contacts",
        table.len()
    );
    for c in table {
        println!(
            "  {}  {:<22} bucket {:>3}  seen {}s ago",
            s(&c["id"]),
            s(&c["addr"]),
            s(&c["bucket"]),
            s(&c["last_seen_s_ago"])
        );
    }
    let conns = v["connections"].as_array().unwrap_or(&empty);
    println!(
        "
connections: {}",
        conns.len()
    );
    for c in conns {
        let rtt = c["rtt_ms"]
            .as_f64()
            .map_or("-".to_owned(), |r| format!("{r:.1} ms"));
        let state = match (c["connected"] == true, c["via"].as_str()) {
            (true, Some(via)) => format!("connected, relayed via {via}"),
            (true, None) => "connected, direct".to_owned(),
            (false, _) => "idle".to_owned(),
        };
        println!(
            "  {}  {:<22} {:<12} rtt {:<9} failures {}  models {}",
            s(&c["id"]),
            s(&c["addr"]),
            state,
            rtt,
            s(&c["recent_failures"]),
            s(&c["models"])
        );
    }
    let models = v["models"].as_array().unwrap_or(&empty);
    println!(
        "
models on the network: {}",
        models.len()
    );
    for m in models {
        println!(
            "  {:<40} {} providers",
            s(&m["model"]),
            s(&m["provider_count"])
        );
    }
    let records = v["provider_records"].as_array().unwrap_or(&empty);
    println!(
        "
provider records held here: {}",
        records.len()
    );
    for r in records {
        println!(
            "  {:<32} {}  {}  {} tok/s  {} free slots  expires in {}s",
            s(&r["model"]),
            s(&r["publisher"]),
            s(&r["addrs"]),
            s(&r["decode_tokens_per_s"]),
            s(&r["free_slots"]),
            s(&r["expires_in_s"])
        );
    }
    Ok(())
}

fn ledger_cmd(cmd: LedgerCmd, data_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use hypha_node::api::account;
    let dir = hypha_node::identity::data_dir(data_dir)?;
    let key = dir.join(hypha_node::identity::KEY_FILE);
    anyhow::ensure!(
        key.exists(),
        "no node identity in {} (run `hypha up` or `hypha id` first)",
        dir.display()
    );
    let me = hypha_node::identity::Identity::load_or_create(&dir)?.id();
    let path = dir.join(hypha_ledger::LOG_FILE);
    let mut receipts = Vec::new();
    let recovery = if path.exists() {
        hypha_ledger::log::read(&path, &mut |r| {
            receipts.push(r);
            Ok(())
        })
        .with_context(|| format!("cannot read {}", path.display()))?
    } else {
        hypha_ledger::Recovery::default()
    };
    if recovery.truncated_bytes > 0 {
        eprintln!(
            "hypha: the log ends in {} bytes of a torn write (cut at the node's next start)",
            recovery.truncated_bytes
        );
    }
    // Verify checks every record; the rest show each request once, by its
    // latest receipt, as the node counts it.
    let records = receipts.len();
    let receipts = if matches!(cmd, LedgerCmd::Verify) {
        receipts
    } else {
        hypha_ledger::latest_of_each(receipts)
    };
    match cmd {
        LedgerCmd::Balance => {
            let mut t = hypha_ledger::Totals::default();
            for r in &receipts {
                let rc = &r.receipt;
                if rc.seeder == me {
                    t.earned = t.earned.saturating_add(rc.credits);
                    t.receipts_as_seeder += 1;
                }
                if rc.consumer == me {
                    t.spent = t.spent.saturating_add(rc.credits);
                    t.receipts_as_consumer += 1;
                }
            }
            println!("node     {me}");
            println!(
                "earned   {:>14} ({} requests served)",
                t.earned, t.receipts_as_seeder
            );
            println!(
                "spent    {:>14} ({} requests consumed)",
                t.spent, t.receipts_as_consumer
            );
            println!("balance  {:>14} micro-credits", hypha_ledger::balance(&t));
        }
        LedgerCmd::Receipts { limit } => {
            println!(
                "{:<24} {:<9} {:<16} {:>7} {:>7} {:>9}",
                "finished (unix ms)", "role", "peer", "prompt", "tokens", "credits"
            );
            for r in receipts.iter().rev().take(limit) {
                let rc = &r.receipt;
                let (role, peer) = if rc.seeder == me {
                    ("served", rc.consumer)
                } else {
                    ("consumed", rc.seeder)
                };
                let peer = peer.to_string();
                println!(
                    "{:<24} {:<9} {:<16} {:>7} {:>7} {:>9}",
                    rc.finished_ms,
                    role,
                    peer.get(..16).unwrap_or(&peer),
                    rc.prompt_tokens,
                    rc.completion_tokens,
                    rc.credits
                );
            }
        }
        LedgerCmd::Verify => {
            for chunk in receipts.chunks(256) {
                hypha_ledger::verify_batch(chunk.to_vec())?;
            }
            let requests = hypha_ledger::latest_of_each(receipts).len();
            println!(
                "{requests} requests in {records} receipts: checksums, hash chain and both signatures on each verify"
            );
        }
        LedgerCmd::Export => {
            for r in &receipts {
                println!("{}", account::receipt_json(r, Some(me)));
            }
        }
        LedgerCmd::Peer { .. } => anyhow::bail!("`hypha ledger peer` asks a running node (--url)"),
    }
    Ok(())
}
