//! The `hypha` command line: a thin layer over the `hypha_node` library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hypha_engine::{DeviceChoice, EngineConfig, GpuLayers};
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
    /// Run a node: load a model and serve the OpenAI API.
    Up(UpArgs),
    /// Start a node on the default model, stream one chat completion through
    /// its API, then keep serving (or exit with --exit).
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
    /// Print this node's id (creating its key on first use).
    Id {
        /// Where the node keeps its key (default: $HYPHA_HOME or the XDG data directory).
        #[arg(long, env = "HYPHA_HOME")]
        data_dir: Option<PathBuf>,
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
}

#[derive(clap::Args)]
struct UpArgs {
    /// `default`, a cached model's name, or a path to a GGUF file.
    #[arg(long, default_value = "default")]
    model: String,
    /// Address for the HTTP API.
    #[arg(long, default_value = DEFAULT_HTTP_ADDR)]
    http: SocketAddr,
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
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long, env = "HYPHA_API_KEY")]
    api_key: Option<String>,
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
            let node = start_node(up).await?;
            demo(&node, &ask).await?;
            if exit {
                return node.stop().await;
            }
            eprintln!(
                "\nhypha: the node keeps serving; point any OpenAI client at http://{}/v1 (Ctrl-C stops it)",
                node.http_addr()
            );
            serve(node).await
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
            };
            println!(
                "hypha bench: {} model {} ({} requests per level, {} max tokens, greedy)",
                cfg.url, cfg.model, cfg.requests, cfg.max_tokens
            );
            let reports = hypha_bench::run(&client, &cfg).await;
            print!("{}", hypha_bench::format_table(&reports));
            Ok(())
        }
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

async fn start_node(a: UpArgs) -> anyhow::Result<Node> {
    let model_path: PathBuf = hypha_node::resolve_model(&a.model)
        .await
        .with_context(|| format!("cannot find model {:?}", a.model))?;
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
    let aliases = if a.model == "default" {
        vec!["default".to_owned()]
    } else {
        Vec::new()
    };
    let node = Node::start(NodeConfig {
        engine,
        http_addr: a.http,
        api_key: a.api_key,
        model_aliases: aliases,
    })
    .await?;
    let info = node.engine().info();
    eprintln!(
        "hypha: serving {} on {} at http://{}/v1",
        info.name,
        info.device,
        node.http_addr()
    );
    Ok(node)
}

async fn serve(node: Node) -> anyhow::Result<()> {
    node.run_until(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("hypha: shutting down");
    })
    .await
}

/// Sends one streaming chat completion to the node's own HTTP API, the way
/// any OpenAI client would, and reports what it measured.
async fn demo(node: &Node, ask: &str) -> anyhow::Result<()> {
    let client = models::http_client()?;
    let base = format!("http://{}", node.http_addr());
    let model = node.engine().info().name.clone();
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
    Ok(())
}
