//! The `sandpiper` binary: parses the command line, loads the configuration, starts logging
//! and runs the broker until SIGTERM or Ctrl-C.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sandpiper::broker::{Broker, LogHook};
use sandpiper::config::Config;
use tracing_subscriber::EnvFilter;

/// The broker allocates and frees many small objects from several threads (messages,
/// deliveries, parked connections): mimalloc holds them with less overhead than glibc's
/// malloc and hands them out faster (see the `mimalloc` feature in Cargo.toml).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--version`: the broker's version and the plugin contract it hosts.
/// Log lines waiting for standard error at most; beyond, new lines are dropped.
const LOG_LINES_QUEUED: usize = 16_384;

fn version() -> &'static str {
    static TEXT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{} (plugin contract sandpiper:plugin@{})",
            env!("CARGO_PKG_VERSION"),
            sandpiper::plugins::CONTRACT_VERSION
        )
    });
    &TEXT
}

/// Sandpiper: an MQTT 3.1, 3.1.1 and 5.0 broker with WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(version = version(), about)]
struct Cli {
    /// Configuration file (TOML). Without it: one listener on 127.0.0.1:1883. Relative
    /// paths inside it are relative to the file's folder.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Folder of the durable store (overrides `[store] data_dir`; relative to the working
    /// directory; default ./data, or `data` beside the configuration file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Check everything the broker would load at start (the configuration, TLS
    /// certificates, keys and client CAs, each plugin with its sidecar) without binding a
    /// port or opening the store, and exit (1 when anything fails).
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Plugin tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Adds or changes a user in a password file of the password-auth plugin (one
    /// `user:hash` line per user; created when missing). The password is read from the
    /// terminal (twice, not echoed) or from standard input, never from the command line.
    Passwd {
        /// The password file.
        file: PathBuf,
        /// The user name.
        user: String,
        /// PBKDF2-SHA256 iterations (the default keeps a check in the plugin under
        /// about 10 ms on a 2-core machine).
        #[arg(long, default_value_t = sandpiper::passwd::DEFAULT_ITERATIONS)]
        iterations: u32,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
    },
    /// The admin API from the command line (`--url`, `--token` or SANDPIPER_URL and
    /// SANDPIPER_TOKEN; human tables, or `--json`).
    Ctl(sandpiper::ctl::CtlArgs),
    /// Admin API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Makes a token: prints it alone on the first line (it is shown only once; the broker
    /// keeps only its hash), then the `[[http.token]]` lines for the configuration.
    New {
        /// The token's name, logged with every changing request made with it.
        name: String,
        /// `admin` (everything) or `read` (GET only).
        #[arg(long, default_value = "admin", value_parser = ["admin", "read"])]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Validate a component against the plugin contract and list the hooks it implements
    /// (exit code 1 when it does not load).
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
    },
}

/// Installs the log subscriber: the filter (`[log] level`, or `RUST_LOG`) and both line
/// formats, one of them on at a time. Returns what a configuration reload calls to change
/// the level and the format.
fn init_logs(
    filter: EnvFilter,
    writer: tracing_appender::non_blocking::NonBlocking,
    format: sandpiper::config::LogFormat,
) -> LogHook {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = Arc::new(AtomicBool::new(
        format == sandpiper::config::LogFormat::Json,
    ));
    let (as_json, as_text) = (json.clone(), json.clone());
    let text = tracing_subscriber::fmt::layer()
        .with_writer(writer.clone())
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter_fn(move |_| !as_text.load(Ordering::Relaxed)));
    let lines = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_writer(writer)
        .with_filter(filter_fn(move |_| as_json.load(Ordering::Relaxed)));
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(lines)
        .init();
    let level_from_env = std::env::var_os("RUST_LOG").is_some();
    LogHook(Box::new(move |log| {
        if !level_from_env {
            let filter = EnvFilter::try_new(&log.level).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())?;
        }
        json.store(
            log.format == sandpiper::config::LogFormat::Json,
            Ordering::Relaxed,
        );
        Ok(())
    }))
}

/// `sandpiper token new NAME`.
fn token_new(name: &str, role: &str) -> ExitCode {
    if name.is_empty() || name.contains(['"', '\\', '\n']) {
        eprintln!("sandpiper: a token name is non-empty text without quotes or backslashes");
        return ExitCode::from(2);
    }
    match sandpiper::passwd::new_token() {
        Ok((token, hash)) => {
            println!("{token}");
            println!();
            println!("[[http.token]]");
            println!("name = \"{name}\"");
            println!("hash = \"{hash}\"");
            println!("role = \"{role}\"");
            ExitCode::SUCCESS
        }
        Err(_) => {
            eprintln!("sandpiper: no random numbers from the system");
            ExitCode::FAILURE
        }
    }
}

/// `sandpiper plugin check FILE`: compiles and links the component as the broker would
/// (sidecar `FILE.toml` included when present) and instantiates it once, running `init`.
fn plugin_check(file: &std::path::Path) -> ExitCode {
    use sandpiper::plugins::{host::Host, plugin::Plugin, sidecar::Sidecar};
    let fail = |what: String| {
        eprintln!("sandpiper: {}: {what}", file.display());
        ExitCode::FAILURE
    };
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => return fail(e.to_string()),
    };
    let sidecar = match Sidecar::for_component(file) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let cache = std::env::temp_dir().join("sandpiper-plugin-check-cache");
    let host = match Host::new(&cache) {
        Ok(h) => h,
        Err(e) => return fail(format!("plugin engine: {e}")),
    };
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin");
    match Plugin::load(&host, name, &bytes, sidecar, Default::default()) {
        Ok(p) => {
            let hooks = p.hooks.names();
            if hooks.is_empty() {
                println!("{name}: valid component, but it implements no hook");
            } else {
                println!("{name}: ok; hooks: {}", hooks.join(", "));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("{e:#}")),
    }
}

/// `--check-config`: loads, without binding a port or opening the store, everything the
/// broker loads at start: each TLS listener's certificate chain, key and client CAs, and
/// each plugin of the plugins folder with its sidecar (compiled, linked and `init`ed as
/// the broker would, its compiled code cached where the broker keeps it).
fn check_config(config: &Config) -> ExitCode {
    use sandpiper::plugins::{host::Host, plugin::Plugin, sidecar::Sidecar};
    let mut failed = false;
    let mut fail = |what: String| {
        eprintln!("sandpiper: {what}");
        failed = true;
    };
    for (what, path) in config.paths() {
        println!("{what}: {}", path.display());
    }
    for l in &config.listeners {
        let name = l.name.as_deref().unwrap_or("listener");
        if let Some(files) = sandpiper::listener::tls_files(l) {
            match sandpiper::transport::tls::server_config(&files) {
                Ok(_) => println!("listener {name}: TLS certificate, key and client CA ok"),
                Err(e) => fail(format!("listener {name}: TLS configuration: {e}")),
            }
        }
    }
    let dir = &config.plugins.dir;
    let mut wasm: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("wasm"))
            .collect(),
        Err(_) => Vec::new(),
    };
    wasm.sort();
    if config.plugins.enabled && !wasm.is_empty() {
        match Host::new(&config.store.data_dir.join("plugin-cache")) {
            Err(e) => fail(format!("plugin engine: {e}")),
            Ok(host) => {
                for file in wasm {
                    let name = file
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or("plugin");
                    let sidecar = match Sidecar::for_component(&file) {
                        Ok(s) => s,
                        Err(e) => {
                            fail(format!("plugin {name}: {e}"));
                            continue;
                        }
                    };
                    let loaded =
                        std::fs::read(&file)
                            .map_err(|e| e.to_string())
                            .and_then(|bytes| {
                                Plugin::load(&host, name, &bytes, sidecar, Default::default())
                                    .map_err(|e| format!("{e:#}"))
                            });
                    match loaded {
                        Ok(p) => {
                            println!("plugin {name}: ok; hooks: {}", p.hooks.names().join(", "))
                        }
                        Err(e) => fail(format!("plugin {name}: {}: {e}", file.display())),
                    }
                }
            }
        }
    }
    for r in &config.plugins.required {
        if !dir.join(format!("{r}.wasm")).exists() {
            fail(format!(
                "required plugin {r}: no {r}.wasm in {}",
                dir.display()
            ));
        }
    }
    if failed {
        return ExitCode::FAILURE;
    }
    println!("configuration ok");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(Command::Ctl(_)) = &cli.command
        && let Some(Command::Ctl(args)) = cli.command.take()
    {
        return sandpiper::ctl::run(args);
    }
    match &cli.command {
        Some(Command::Plugin {
            command: PluginCommand::Check { file },
        }) => return plugin_check(file),
        Some(Command::Passwd {
            file,
            user,
            iterations,
            delete,
        }) => {
            return match sandpiper::passwd::run(file, user, *iterations, *delete) {
                Ok(what) => {
                    eprintln!("sandpiper: {}: {what}", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sandpiper: {}: {e}", file.display());
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Token {
            command: TokenCommand::New { name, role },
        }) => return token_new(name, role),
        Some(Command::Ctl(_)) | None => {}
    }
    let mut config = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sandpiper: invalid configuration {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Some(dir) = cli.data_dir {
        config.store.data_dir = dir;
    }
    if cli.check_config {
        return check_config(&config);
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Log lines go through a bounded queue to a thread of their own: a standard error
    // nobody reads (a full pipe) drops lines, counted, instead of stopping the broker.
    let (writer, _flush_at_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_LINES_QUEUED)
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    sandpiper::count_dropped_log_lines(writer.error_counter());
    let log_hook = init_logs(filter, writer, config.log.format);

    prepare_descriptors(config.mqtt.max_connections);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(config.runtime.worker_threads());
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sandpiper: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        version = version(),
        workers = runtime.metrics().num_workers(),
        "runtime started"
    );
    if let Some(path) = &cli.config {
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        tracing::info!(path = %abs.display(), "configuration");
    }
    for (what, path) in config.paths() {
        tracing::info!(path = %path.display(), "{what}");
    }
    match runtime.block_on(run(config, cli.config, log_hook)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, source: Option<PathBuf>, log_hook: LogHook) -> anyhow::Result<()> {
    let broker = Broker::new(config)?;
    if let Some(path) = source {
        let _ = broker.source.set(path);
    }
    let _ = broker.log_hook.set(log_hook);
    let shutdown = broker.shutdown.clone();
    // Signal handlers are installed before any listener is bound, so a SIGTERM sent as soon
    // as the broker reports it is listening still shuts it down in order.
    let signals = Signals::install();
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let b = broker.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration and TLS certificates");
                b.reload_certificates();
                if b.source.get().is_some()
                    && let Err(e) = sandpiper::reload::reload(&b).await
                {
                    tracing::warn!(error = %e, "configuration not reloaded: the one in force stays");
                }
            }
        });
    }
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    let serving = sandpiper::server::run(broker.clone(), Duration::from_secs(5));
    match serving.await {
        Ok(_) => Ok(()),
        Err(e) => {
            broker.shutdown.cancel();
            Err(anyhow::anyhow!("cannot start: {e}"))
        }
    }
}

/// SIGTERM and Ctrl-C, registered up front.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        Signals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    async fn wait(self) {
        #[cfg(unix)]
        if let Some(mut term) = self.term {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Descriptors the broker needs beside its connections (store, plugins, listeners, logs).
const SPARE_DESCRIPTORS: u64 = 1024;

/// Raises the soft limit on open files toward the hard one, as far as `max_connections`
/// needs, and grows the descriptor table to that size now, while the process has one
/// thread. Each time a multi-threaded process's table doubles (at 256, 512, 1,024, ...
/// descriptors) Linux waits for an RCU grace period inside the `accept` that grew it:
/// 5-17 ms on this virtual machine, during which no connection was accepted.
fn prepare_descriptors(max_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let want = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(SPARE_DESCRIPTORS);
    let mut limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if soft < want && soft < hard {
        let raised = want.min(hard);
        limit.current = Some(raised);
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => tracing::info!(from = soft, to = raised, "raised the open-files limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
    }
    let top = getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
        .min(want);
    // The lowest free descriptor at or above `top - 1`: the table grows to hold it.
    let Ok(top) = i32::try_from(top.saturating_sub(1)) else {
        return;
    };
    match rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), top) {
        Ok(fd) => drop(fd),
        Err(e) => tracing::debug!(error = %e, top, "cannot size the descriptor table"),
    }
}
