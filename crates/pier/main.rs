//! `pier`: the binary. Reads the configuration, wires the upstream clients, the cache and the HTTP
//! front together, and runs them until SIGINT or SIGTERM; or manages a stopped cache directory.

mod config;
mod warm;
mod wiring;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use pier_metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    /// Exit 0 if a health endpoint answers 2xx within 3 seconds (for container health checks,
    /// where there is no curl).
    Probe {
        #[arg(default_value = "http://127.0.0.1:9090/readyz")]
        url: String,
    },
    /// Show what a stopped cache directory holds.
    Du(DirArgs),
    /// Apply the disk budget and age limit to a stopped cache directory, and collect hosted
    /// content no hosted manifest names (unused for `hosted.gc_grace`).
    Gc(DirArgs),
    /// Remove digests (sha256:...) or repositories' tags (library/nginx, ghcr.io/org/app) from a
    /// stopped cache directory.
    Purge {
        #[command(flatten)]
        dir: DirArgs,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Pull images (manifests and every blob) into the cache: through a running pier's admin API
    /// with --admin, or directly into a stopped cache directory.
    Warm {
        #[command(flatten)]
        dir: DirArgs,
        /// Admin API of a running pier, e.g. http://127.0.0.1:9091
        #[arg(long, env = "PIER_ADMIN_URL")]
        admin: Option<String>,
        /// Only these platforms of an index (os/arch[/variant]); all when not given.
        #[arg(long = "platform")]
        platforms: Vec<String>,
        /// Leave out the images' signatures, attestations and referrers.
        #[arg(long)]
        no_signatures: bool,
        /// Images as clients name them: nginx:1.25, ghcr.io/org/app:v2, name@sha256:...
        #[arg(required = true)]
        images: Vec<String>,
    },
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
    /// Address of the admin listener (stats, purge, eviction), e.g. 127.0.0.1:9091
    #[arg(long, env = "PIER_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
}

/// Which cache directory an offline command works on.
#[derive(Args)]
struct DirArgs {
    /// Configuration file [default: mirror.yaml in the working directory, if present]
    #[arg(long, env = "PIER_CONFIG")]
    config: Option<PathBuf>,
    /// Cache directory
    #[arg(long, env = "PIER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, serving) = match &cli.command {
        Command::CheckConfig { file } => return check_config(file.clone()),
        Command::Probe { url } => return probe(url),
        Command::Serve(args) => (load_serve(args), true),
        Command::Du(dir)
        | Command::Gc(dir)
        | Command::Purge { dir, .. }
        | Command::Warm { dir, .. } => (load_dir(dir), false),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pier: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if serving {
        init_logging(&config);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pier: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(_) => serve(config).await,
            Command::Du(_) => du(&config).await,
            Command::Gc(_) => gc(&config).await,
            Command::Purge { targets, .. } => purge(&config, &targets).await,
            Command::Warm {
                admin,
                platforms,
                no_signatures,
                images,
                ..
            } => {
                let options = pier_server::warm::WarmOptions {
                    platforms,
                    signatures: !no_signatures,
                };
                warm::run(&config, admin.as_deref(), &images, &options).await
            }
            Command::CheckConfig { .. } | Command::Probe { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("pier: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: Option<PathBuf>) -> ExitCode {
    let result = Config::load(file.as_deref()).and_then(|(mut config, path)| {
        config.finish()?;
        for (i, u) in config.upstreams.iter().enumerate() {
            wiring::upstream_client(u, i, Arc::new(Metrics::new()))
                .map_err(|e| ConfigError::field(&format!("upstreams[{i}]"), e))?;
            wiring::search_endpoint(u, Arc::new(Metrics::new()))
                .map_err(|e| ConfigError::field(&format!("upstreams[{i}].search_url"), e))?;
        }
        config.region()?;
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
                if let Some(search) = &u.search_url {
                    println!("  search: {search}");
                }
            }
            if let Some(c) = &config.cluster {
                println!("cluster: advertised as {}", c.advertise);
            }
            if let Some(s) = &config.shared_store {
                println!("shared_store: bucket {} at {}", s.bucket, s.endpoint);
            }
            if let Some(h) = &config.hosted {
                println!("hosted: {}", h.repositories.join(", "));
            }
            for w in config.warnings() {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pier: configuration error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(url: &str) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| {
            rt.block_on(async {
                let client = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(3))
                    .build()?;
                client.get(url).send().await?.error_for_status()
            })
        });
    match result {
        Ok(Ok(_)) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("pier: {url}: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pier: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The file, then the flags and environment on top, then the defaults and checks.
fn load_serve(args: &ServeArgs) -> Result<Config, ConfigError> {
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
    if let Some(addr) = args.admin_listen {
        config.admin.listen = Some(addr);
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

fn load_dir(args: &DirArgs) -> Result<Config, ConfigError> {
    let (mut config, _) = Config::load(args.config.as_deref())?;
    if let Some(dir) = &args.cache_dir {
        config.cache.dir = dir.clone();
    }
    config.finish()?;
    Ok(config)
}

fn init_logging(config: &Config) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Config) -> Result<(), String> {
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let mirror = wiring::mirror(&config)?;
    if let Some(region) = mirror.cache.region() {
        region.start().await;
    }
    let options = wiring::server_options(&config)?;
    match &options.tls {
        Some(tls) => {
            tokio::spawn(tls.clone().watch(std::time::Duration::from_secs(10)));
        }
        // SIGHUP would otherwise end the process.
        None => {
            tokio::spawn(async {
                let hangup = tokio::signal::unix::SignalKind::hangup();
                if let Ok(mut s) = tokio::signal::unix::signal(hangup) {
                    while s.recv().await.is_some() {
                        tracing::info!("SIGHUP: nothing to reload (no tls section)");
                    }
                }
            });
        }
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    for u in &config.upstreams {
        tracing::info!(name = %u.name, url = %u.url(), "upstream");
    }
    // One signal stops every listener and the maintenance task.
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let maintenance = tokio::spawn(
        mirror
            .cache
            .clone()
            .run_maintenance(config.cache.maintenance_interval),
    );
    let collecting = config
        .hosted
        .as_ref()
        .filter(|h| !h.gc_interval.is_zero())
        .map(|h| tokio::spawn(mirror.cache.clone().run_gc(h.gc_interval)));
    let warming = (!config.warm.images.is_empty()).then(|| {
        let (m, w) = (mirror.clone(), config.warm.clone());
        tokio::spawn(async move {
            let options = w.options();
            loop {
                m.warm_all(&w.images, &options).await;
                tokio::time::sleep(w.interval).await;
            }
        })
    });
    if let Some(ops_addr) = config.metrics.listen {
        let ops = TcpListener::bind(ops_addr)
            .await
            .map_err(|e| format!("cannot listen on {ops_addr} (metrics.listen): {e}"))?;
        tracing::info!(addr = %ops.local_addr().map_err(|e| e.to_string())?, "metrics and health listening");
        let (m, rx) = (mirror.clone(), stopped.clone());
        tokio::spawn(async move {
            if let Err(e) = pier_server::serve_ops(ops, m, until_stopped(rx)).await {
                tracing::error!(error = %e, "operations listener failed");
            }
        });
    }
    if let Some(admin_addr) = config.admin.listen {
        let admin = TcpListener::bind(admin_addr)
            .await
            .map_err(|e| format!("cannot listen on {admin_addr} (admin.listen): {e}"))?;
        tracing::info!(addr = %admin.local_addr().map_err(|e| e.to_string())?, "admin API listening");
        let (m, rx) = (mirror.clone(), stopped.clone());
        tokio::spawn(async move {
            if let Err(e) = pier_server::serve_admin(admin, m, until_stopped(rx)).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
    }
    tracing::info!(%addr, cache_dir = %config.cache.dir.display(), "pier listening");
    pier_server::serve(listener, mirror.clone(), options, until_stopped(stopped))
        .await
        .map_err(|e| e.to_string())?;
    // Let fills that were being committed finish, so that what clients received is kept.
    mirror
        .cache
        .wait_for_fills(None, std::time::Duration::from_secs(10))
        .await;
    // And upload steps, which run to their end whatever happened to their requests.
    mirror
        .cache
        .wait_for_uploads(std::time::Duration::from_secs(10))
        .await;
    maintenance.abort();
    if let Some(c) = collecting {
        c.abort();
    }
    if let Some(w) = warming {
        w.abort();
    }
    mirror.cache.flush_access_times().await;
    tracing::info!("pier stopped");
    Ok(())
}

async fn du(config: &Config) -> Result<(), String> {
    let mirror = wiring::mirror(config)?;
    let usage = mirror.cache.usage().await;
    println!(
        "{}: {} bytes in {} objects",
        config.cache.dir.display(),
        usage.disk_bytes + usage.hosted.stored_bytes,
        usage.disk_objects
    );
    if usage.hosted.stored_bytes + usage.hosted.uploading_bytes > 0 {
        println!(
            "hosted: {} bytes stored, {} bytes in uploads under way{}",
            usage.hosted.stored_bytes,
            usage.hosted.uploading_bytes,
            match usage.hosted.max_size {
                0 => String::new(),
                max => format!(" (budget {max} bytes)"),
            }
        );
    }
    if usage.max_size > 0 {
        println!(
            "budget: {} bytes ({:.1}% used)",
            usage.max_size,
            100.0 * usage.disk_bytes as f64 / usage.max_size as f64
        );
    }
    let repos = mirror
        .cache
        .repositories()
        .await
        .map_err(|e| e.to_string())?;
    println!("repositories with tags: {}", repos.len());
    Ok(())
}

async fn gc(config: &Config) -> Result<(), String> {
    let mirror = wiring::mirror(config)?;
    let report = mirror.evict().await.map_err(|e| e.to_string())?;
    println!("removed {} objects, {} bytes", report.removed, report.bytes);
    // Hosted content no hosted manifest names, unused for the grace period.
    let gc = mirror.collect_garbage().await.map_err(|e| e.to_string())?;
    if gc.removed + gc.unpinned + gc.live + gc.kept_recent > 0 {
        println!(
            "hosted: removed {} objects ({} manifests), {} bytes; {} handed back to the mirror ({} bytes); {} kept as used within the grace period",
            gc.removed, gc.manifests, gc.bytes, gc.unpinned, gc.unpinned_bytes, gc.kept_recent
        );
    }
    mirror.cache.flush_access_times().await;
    Ok(())
}

async fn purge(config: &Config, targets: &[String]) -> Result<(), String> {
    let mirror = wiring::mirror(config)?;
    for target in targets {
        let purged = mirror.purge(target).await.map_err(|e| e.message)?;
        println!(
            "{} {}: {} removed",
            purged.kind, purged.target, purged.removed
        );
    }
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
