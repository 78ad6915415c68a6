//! `pier`: the binary. Reads the configuration, wires the upstream clients, the cache and the HTTP
//! front together, and runs them until SIGINT or SIGTERM.

mod config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use pier_cache::{Cache, CacheConfig, RetryPolicy};
use pier_metrics::Metrics;
use pier_server::{Mirror, ServerOptions, UpstreamEntry};
use pier_upstream::{Credentials, Upstream, UpstreamConfig};

use config::{Config, ConfigError, LogFormat, UpstreamSection};

#[derive(Parser)]
#[command(
    name = "pier",
    version,
    about = "A pull-through caching mirror for container registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror.
    Serve(ServeArgs),
    /// Check a configuration file (default: mirror.yaml) and exit non-zero if it is wrong.
    CheckConfig { file: Option<PathBuf> },
}

/// Flags override the configuration file; each can also come from the environment.
#[derive(Args)]
struct ServeArgs {
    /// Configuration file [default: mirror.yaml in the working directory, if present]
    #[arg(long, env = "PIER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:5000
    #[arg(long, env = "PIER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Cache directory
    #[arg(long, env = "PIER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// URL of the default upstream, e.g. http://127.0.0.1:5001
    #[arg(long, env = "PIER_UPSTREAM")]
    upstream: Option<String>,
    /// Log format: text or json
    #[arg(long, env = "PIER_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Address of the operations listener (/metrics, /healthz, /readyz), e.g. 127.0.0.1:9090
    #[arg(long, env = "PIER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(file),
        Command::Serve(args) => match load(&args) {
            Ok(config) => run(config),
            Err(e) => {
                eprintln!("pier: configuration error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn check_config(file: Option<PathBuf>) -> ExitCode {
    let result = Config::load(file.as_deref()).and_then(|(mut config, path)| {
        config.finish()?;
        for (i, u) in config.upstreams.iter().enumerate() {
            upstream_client(u, i, Arc::new(Metrics::new()))
                .map_err(|e| ConfigError::field(&format!("upstreams[{i}]"), e))?;
        }
        Ok((config, path))
    });
    match result {
        Ok((config, path)) => {
            let from = path.map_or("built-in defaults".to_string(), |p| p.display().to_string());
            println!("{from}: OK");
            println!("listen: {}", config.listen);
            println!("cache.dir: {}", config.cache.dir.display());
            for (i, u) in config.upstreams.iter().enumerate() {
                let default = if i == config.default_upstream() {
                    " (default)"
                } else {
                    ""
                };
                println!("upstream {}: {}{default}", u.name, u.url());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pier: configuration error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The file, then the flags and environment on top, then the defaults and checks.
fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
    let (mut config, _) = Config::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.cache_dir {
        config.cache.dir = dir.clone();
    }
    if let Some(format) = &args.log_format {
        config.log.format = if format == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    if let Some(addr) = args.metrics_listen {
        config.metrics.listen = Some(addr);
    }
    if let Some(url) = &args.upstream {
        if config.upstreams.is_empty() {
            config.upstreams.push(UpstreamSection::named("docker.io"));
        }
        let i = config.default_upstream();
        config.upstreams[i].url = Some(url.clone());
    }
    config.finish()?;
    Ok(config)
}

fn upstream_client(
    u: &UpstreamSection,
    index: usize,
    metrics: Arc<Metrics>,
) -> Result<Upstream, String> {
    let credentials = match (
        &u.username,
        u.password(&format!("upstreams[{index}]"))
            .map_err(|e| e.0)?,
    ) {
        (Some(username), password) => Some(Credentials {
            username: username.clone(),
            password: password.unwrap_or_default(),
        }),
        (None, _) => None,
    };
    Upstream::new(
        UpstreamConfig {
            name: u.name.clone(),
            url: u.url(),
            credentials,
            ca_file: u.ca_file.clone(),
            connect_timeout: u.connect_timeout,
            read_timeout: u.read_timeout,
        },
        metrics,
    )
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(config: Config) -> ExitCode {
    init_logging(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("pier: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let metrics = Arc::new(Metrics::new());
    let mut upstreams = Vec::new();
    for (i, u) in config.upstreams.iter().enumerate() {
        let client =
            upstream_client(u, i, metrics.clone()).map_err(|e| format!("upstreams[{i}]: {e}"))?;
        let mut entry = UpstreamEntry::new(&u.name, Arc::new(client));
        entry.library_prefix = u.library_prefix();
        entry.tag_ttl = u.tag_ttl;
        entry.immutable_tags = u.immutable_tags_regex().map_err(|e| e.to_string())?;
        entry.rate_limit_reserve = u.rate_limit_reserve;
        entry.access = u.access()?;
        upstreams.push(entry);
    }
    let cache_config = CacheConfig {
        dir: config.cache.dir.clone(),
        memory_size: config.cache.memory_size.0,
        memory_object_size: config.cache.memory_object_size.0,
        retry: RetryPolicy {
            attempts: config.cache.fill_retries,
            ..RetryPolicy::default()
        },
    };
    let cache = Cache::open(cache_config, metrics.clone()).map_err(|e| {
        format!(
            "cannot open cache directory {}: {e}",
            config.cache.dir.display()
        )
    })?;
    let mirror = Arc::new(Mirror::new(
        upstreams,
        config.default_upstream(),
        Arc::new(cache),
        metrics,
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    for u in &config.upstreams {
        tracing::info!(name = %u.name, url = %u.url(), "upstream");
    }
    // One signal stops both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(ops_addr) = config.metrics.listen {
        let ops = tokio::net::TcpListener::bind(ops_addr)
            .await
            .map_err(|e| format!("cannot listen on {ops_addr} (metrics.listen): {e}"))?;
        tracing::info!(addr = %ops_addr, "metrics and health listening");
        let (m, rx) = (mirror.clone(), stopped.clone());
        tokio::spawn(async move {
            if let Err(e) = pier_server::serve_ops(ops, m, until_stopped(rx)).await {
                tracing::error!(error = %e, "operations listener failed");
            }
        });
    }
    tracing::info!(%addr, cache_dir = %config.cache.dir.display(), "pier listening");
    let options = ServerOptions {
        metrics_on_main: config.metrics.on_main_listener,
        ..ServerOptions::default()
    };
    pier_server::serve(listener, mirror, options, until_stopped(stopped))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("pier stopped");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("stopping");
}
