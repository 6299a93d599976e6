//! What one plugin costs the broker: component size, load time (compile or code-cache hit,
//! link, first instance), first-call and per-call latency of its hook, and the resident
//! memory it adds. Everything goes through `sandpiper::plugins::Plugins`, as in the
//! broker. Measures the first hook the component exports among `authenticate`,
//! `authorize` (one SUBSCRIBE filter) and `transform` (one 47-byte JSON message), one call at
//! a time on the calling thread.
//!
//! ```sh
//! cargo run --release -p sandpiper --example plugin_cost -- FILE.wasm [--sidecar FILE.toml] \
//!     [--user NAME --password PW] [--topic TOPIC] [--calls N] [--cache DIR]
//! ```
//!
//! Without `--cache`, the code cache is a fresh folder: the load compiles (a broker's first
//! start). Run it twice with the same `--cache DIR` to measure a restart (a cache hit);
//! memory is best read from that second run, as compiling leaves garbage in the allocator.
//! Documented in docs/plugins.md, "What a plugin costs".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use sandpiper::codec::{MessageProperties, ProtocolVersion, QoS, TopicName};
use sandpiper::message::{Draft, Principal};
use sandpiper::plugins::flow::Fate;
use sandpiper::plugins::host::Host;
use sandpiper::plugins::{Action, ClientInfo, ConnectInfo, Hooks, Plugins, Request};

#[derive(Parser)]
struct Args {
    /// The component.
    wasm: PathBuf,
    /// Its sidecar (NAME.toml).
    #[arg(long)]
    sidecar: Option<PathBuf>,
    /// CONNECT user name for `authenticate`.
    #[arg(long)]
    user: Option<String>,
    /// CONNECT password for `authenticate`.
    #[arg(long)]
    password: Option<String>,
    /// Topic of the `authorize` request and of the `transform` message.
    #[arg(long, default_value = "devices/dev-1/temperature")]
    topic: String,
    /// Timed calls after the first one.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// The compiled-code cache (`<data_dir>/plugin-cache` in the broker).
    #[arg(long)]
    cache: Option<PathBuf>,
}

/// Resident set size of this process, from /proc.
fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kb * 1024)
}

fn mib(bytes: i128) -> String {
    format!("{:+.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// One call of the measured hook.
enum Hook {
    Authenticate(ConnectInfo),
    Authorize(ClientInfo),
    Transform(ClientInfo, Vec<Draft>),
}

impl Hook {
    /// Calls the hook on this thread, as a connection task does (`authenticate_now`; the
    /// broker's CONNECT path adds a hop to a blocking thread, measured apart).
    fn call(&mut self, plugins: &Plugins, topic: &str) -> String {
        match self {
            Hook::Authenticate(info) => format!("{:?}", plugins.authenticate_now(info.clone())),
            Hook::Authorize(client) => {
                let request = Request {
                    action: Action::Subscribe,
                    topic,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                };
                format!("{:?}", plugins.authorize(client, &[request]))
            }
            Hook::Transform(client, drafts) => {
                let mut fates = vec![Fate::Route; drafts.len()];
                plugins.transform(client, drafts, &mut fates, None);
                format!("{fates:?}")
            }
        }
    }
}

/// Median time of handing a no-op to tokio's blocking pool and back: what the broker adds
/// to each `authenticate` at CONNECT, whatever the plugin.
fn blocking_hop() -> anyhow::Result<Duration> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut hops = runtime.block_on(async {
        let mut hops = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            let _ = tokio::task::spawn_blocking(|| ()).await;
            hops.push(t.elapsed());
        }
        hops
    });
    hops.sort();
    Ok(hops.get(hops.len() / 2).copied().unwrap_or_default())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = args
        .wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .context("the component's file name")?
        .to_owned();
    let size = std::fs::metadata(&args.wasm)
        .with_context(|| format!("{}", args.wasm.display()))?
        .len();
    let dir = std::env::temp_dir().join(format!("sandpiper-plugin-cost-{}", std::process::id()));
    let plugins_dir = dir.join("plugins");
    std::fs::create_dir_all(&plugins_dir)?;
    std::fs::copy(&args.wasm, plugins_dir.join(format!("{name}.wasm")))?;
    if let Some(sidecar) = &args.sidecar {
        std::fs::copy(sidecar, plugins_dir.join(format!("{name}.toml")))?;
    }
    let cache = args.cache.clone().unwrap_or_else(|| dir.join("cache"));
    std::fs::create_dir_all(&cache)?;
    let cached = std::fs::read_dir(&cache)?.next().is_some();

    let t = Instant::now();
    drop(Host::new(&cache).map_err(|e| anyhow::anyhow!("engine: {e}"))?);
    let engine = t.elapsed();

    let rss_before = rss_bytes()?;
    let plugins = Arc::new(Plugins::new(
        Some(plugins_dir),
        cache.clone(),
        None,
        1 << 20,
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    plugins.start(stop.clone());
    let load = t.elapsed();
    let rss_loaded = rss_bytes()?;
    let chain = plugins.chain();
    let Some(plugin) = chain.plugins.first() else {
        bail!("{name} was not loaded (run `sandpiper plugin check` on it)");
    };
    let hooks = plugin.hooks;

    let client = ClientInfo {
        client_id: "dev-1".into(),
        principal: Arc::new(Principal {
            user: args.user.as_deref().map(Arc::from),
            listener: "default".into(),
        }),
        attributes: Box::default(),
    };
    let mut hook = if hooks.has(Hooks::AUTHENTICATE) {
        Hook::Authenticate(ConnectInfo {
            client_id: "dev-1".into(),
            username: args.user.clone(),
            password: args.password.clone().map(String::into_bytes),
            peer: "127.0.0.1:50000".parse()?,
            listener: "default".into(),
            protocol: ProtocolVersion::V5,
            cert_subject: None,
            user_properties: Vec::new(),
            auth_method: None,
            auth_data: None,
        })
    } else if hooks.has(Hooks::AUTHORIZE) {
        Hook::Authorize(client)
    } else if hooks.has(Hooks::TRANSFORM) {
        let draft = Draft {
            topic: TopicName::new(&args.topic).map_err(|e| anyhow::anyhow!("{e}"))?,
            payload: Bytes::from_static(br#"{"temperature":21.5,"unit":"C","seq":1234567}  "#),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: MessageProperties::default(),
        };
        Hook::Transform(client, vec![draft])
    } else {
        bail!("{name} exports none of authenticate, authorize, transform");
    };
    let hook_name = hooks.names().first().copied().unwrap_or("?");

    let t = Instant::now();
    let answer = hook.call(&plugins, &args.topic);
    let first = t.elapsed();
    let mut times = Vec::with_capacity(args.calls);
    for _ in 0..args.calls {
        let t = Instant::now();
        std::hint::black_box(hook.call(&plugins, &args.topic));
        times.push(t.elapsed());
    }
    let rss_called = rss_bytes()?;
    times.sort();
    let at = |q: f64| {
        let i = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(i).copied().unwrap_or_default()
    };

    println!("plugin          {name} ({hook_name}; answer {answer})");
    println!("component       {:.1} KiB", size as f64 / 1024.0);
    println!(
        "engine          {:.1} ms (Host::new, for reference)",
        engine.as_secs_f64() * 1e3
    );
    println!(
        "load            {:.1} ms ({})",
        load.as_secs_f64() * 1e3,
        if cached {
            "code cache hit"
        } else {
            "compiled: cold cache"
        }
    );
    println!("first call      {}", micros(first));
    println!(
        "per call        median {}, p99 {} ({} calls)",
        micros(at(0.5)),
        micros(at(0.99)),
        times.len()
    );
    if matches!(hook, Hook::Authenticate(_)) {
        let hop = blocking_hop()?;
        println!(
            "CONNECT adds    {} (median hop to a blocking thread and back)",
            micros(hop)
        );
    }
    println!(
        "resident memory {} after load, {} after the calls",
        mib(i128::from(rss_loaded) - i128::from(rss_before)),
        mib(i128::from(rss_called) - i128::from(rss_before))
    );
    stop.cancel();
    drop(chain);
    drop(plugins);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
