//! `pier warm`: pull images into the cache, with a progress bar on a terminal and plain lines
//! otherwise, through a running pier's admin API or directly on a stopped cache directory.

use std::io::IsTerminal;

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use pier_server::warm::{WarmEvent, WarmOptions, WarmReport};

use crate::config::Config;
use crate::wiring;

/// Shows progress: a spinner with counts on a terminal, one line per object otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {pos} objects, {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Progress { bar }
    }

    fn event(&self, e: &WarmEvent, fetched_so_far: u64) {
        let what = match (&e.error, e.cached) {
            (Some(err), _) => format!("FAILED: {err}"),
            (None, true) => "cached".to_string(),
            (None, false) => format!("fetched {} bytes", e.fetched_bytes),
        };
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(format!(
                    "{:.1} MiB fetched ({})",
                    fetched_so_far as f64 / 1048576.0,
                    e.image
                ));
                if e.error.is_some() {
                    bar.println(format!("{} {} {}: {what}", e.image, e.kind, e.digest));
                }
            }
            None => eprintln!("{} {} {}: {what}", e.image, e.kind, e.digest),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Warms `images`; prints a summary and returns an error when anything failed.
pub async fn run(
    config: &Config,
    admin: Option<&str>,
    images: &[String],
    options: &WarmOptions,
) -> Result<(), String> {
    let progress = Progress::new();
    let reports = match admin {
        Some(url) => through_admin(url, images, options, &progress).await?,
        None => {
            let mirror = wiring::mirror(config).map_err(|e| {
                format!("{e} (is pier running? then warm through it with --admin URL)")
            })?;
            let mut reports = Vec::new();
            for image in images {
                let fetched = std::sync::atomic::AtomicU64::new(0);
                let report = mirror
                    .warm(image, options, &|e| {
                        let total = fetched
                            .fetch_add(e.fetched_bytes, std::sync::atomic::Ordering::Relaxed)
                            + e.fetched_bytes;
                        progress.event(&e, total);
                    })
                    .await;
                reports.push((image.clone(), report));
            }
            mirror.cache.flush_access_times().await;
            reports
        }
    };
    progress.finish();
    let mut failed = 0;
    for (image, r) in &reports {
        println!(
            "{image}: {} manifests, {} blobs ({} of these already cached), {:.1} MiB fetched, {} failed",
            r.manifests,
            r.blobs,
            r.already_cached,
            r.fetched_bytes as f64 / 1048576.0,
            r.failures.len()
        );
        for f in &r.failures {
            println!("  {f}");
        }
        failed += r.failures.len();
    }
    if failed > 0 {
        return Err(format!("{failed} objects could not be warmed"));
    }
    Ok(())
}

/// Asks a running pier to warm (`POST /admin/warm`) and follows its event lines.
async fn through_admin(
    url: &str,
    images: &[String],
    options: &WarmOptions,
    progress: &Progress,
) -> Result<Vec<(String, WarmReport)>, String> {
    let mut query: Vec<(&str, &str)> = images.iter().map(|i| ("image", i.as_str())).collect();
    query.extend(options.platforms.iter().map(|p| ("platform", p.as_str())));
    if !options.signatures {
        query.push(("signatures", "false"));
    }
    let endpoint = format!("{}/admin/warm", url.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .post(&endpoint)
        .query(&query)
        .send()
        .await
        .map_err(|e| format!("cannot reach the admin API at {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!(
            "{endpoint} answered {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        ));
    }
    let mut reports = Vec::new();
    let mut fetched = 0;
    let mut buf = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| format!("the admin API stopped answering: {e}"))?);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let v: serde_json::Value =
                serde_json::from_slice(&line).map_err(|e| format!("bad event line: {e}"))?;
            if let Some(report) = v.get("report") {
                let image = v["image"].as_str().unwrap_or_default().to_string();
                let report: WarmReport =
                    serde_json::from_value(report.clone()).map_err(|e| e.to_string())?;
                reports.push((image, report));
            } else {
                let e: WarmEvent = serde_json::from_value(v).map_err(|e| e.to_string())?;
                fetched += e.fetched_bytes;
                progress.event(&e, fetched);
            }
        }
    }
    if reports.len() != images.len() {
        return Err("the admin API ended before every image was warmed".into());
    }
    Ok(reports)
}
