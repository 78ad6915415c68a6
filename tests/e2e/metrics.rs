//! The live /metrics of a pier that served a real pull passes `promtool check metrics`; the alert
//! rules pass `promtool check rules`; the health endpoints answer.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::process::{path_str, pier, push_image, registry, skopeo};
use crate::support::{http_get, image, require};

#[test]
fn live_metrics_pass_promtool() {
    if !require(&["docker-registry", "skopeo", "promtool"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    image::single_image(&layout, "1", &[100_000]);
    let upstream = registry(&tmp.path().join("registry"));
    push_image(
        &layout,
        "1",
        &format!("{}/library/app:1", upstream.addr),
        false,
    );
    let mirror = pier(&[
        "--cache-dir",
        &path_str(&tmp.path().join("cache")),
        "--upstream",
        &format!("http://{}", upstream.addr),
    ]);
    let ops = mirror.ops.clone();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/app:1", mirror.addr),
        &format!("oci:{}:1", path_str(&tmp.path().join("out"))),
    ]);

    let (status, text) = http_get(&ops, "/metrics");
    assert_eq!(status, 200);
    assert!(text.contains("pier_cache_lookups_total"), "{text}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(http_get(&ops, "/healthz").0, 200);
    assert_eq!(http_get(&ops, "/readyz").0, 200);
}

#[test]
fn alert_rules_pass_promtool() {
    if !require(&["promtool"]) {
        return;
    }
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/prometheus.yml"
    );
    let out = Command::new("promtool")
        .args(["check", "config", config])
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
