//! Signatures and referrers through the mirror: the OCI referrers API (from the upstream's API or
//! its fallback tag), filtering, caching, revalidation, stale answers, attachment tags that are
//! never immutable, and warm bringing signatures along.

use std::time::Duration;

use pier_server::warm::WarmOptions;

use crate::fake_upstream::{hex, Behaviour, FakeUpstream};
use crate::harness::{client, start, Pier, UpstreamSpec};

const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SBOM: &str = "application/spdx+json";

struct Signed {
    image: String,
    sig: String,
    sig_layer: String,
}

/// `library/app:1` and, with `subject` pointing at it, a signature (with one layer) and an SBOM.
fn signed_image(up: &FakeUpstream) -> Signed {
    let layer = up.add_blob(vec![1u8; 1000]);
    let image = up.add_manifest(
        "library/app",
        "1",
        OCI,
        &format!(r#"{{"schemaVersion":2,"mediaType":"{OCI}","layers":[{{"digest":"{layer}","size":1000}}]}}"#),
    );
    let sig_layer = up.add_blob(b"signature payload".to_vec());
    let sig = up.add_manifest(
        "library/app",
        "sig-manifest",
        OCI,
        &format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI}","artifactType":"{SIG}","layers":[{{"digest":"{sig_layer}","size":17}}],"subject":{{"mediaType":"{OCI}","digest":"{image}","size":1}}}}"#
        ),
    );
    up.add_manifest(
        "library/app",
        "sbom-manifest",
        OCI,
        &format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI}","artifactType":"{SBOM}","layers":[],"subject":{{"mediaType":"{OCI}","digest":"{image}","size":1}}}}"#
        ),
    );
    Signed {
        image,
        sig,
        sig_layer,
    }
}

async fn setup(behaviour: Behaviour, ttl: Duration) -> (FakeUpstream, Pier, Signed) {
    let up = FakeUpstream::start(behaviour).await;
    let signed = signed_image(&up);
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.tag_ttl = ttl;
    spec.read_timeout = Duration::from_millis(500);
    let pier = start(vec![spec], (1 << 20, 64 << 10)).await;
    (up, pier, signed)
}

/// The referrers of `digest` through pier: status, `OCI-Filters-Applied`, listed digests.
async fn referrers(pier: &Pier, digest: &str, query: &str) -> (u16, Option<String>, Vec<String>) {
    let r = client()
        .get(format!("{}/v2/app/referrers/{digest}{query}", pier.url))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_eq!(r.headers()["content-type"], INDEX);
    let filters = r
        .headers()
        .get("oci-filters-applied")
        .map(|v| v.to_str().unwrap().to_string());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["mediaType"], INDEX);
    let digests = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    (status, filters, digests)
}

#[tokio::test]
async fn referrers_api_answers_filtered_kept_and_stale() {
    let (up, pier, s) = setup(
        Behaviour {
            referrers_api: true,
            ..Behaviour::default()
        },
        Duration::from_secs(300),
    )
    .await;
    let (status, filters, all) = referrers(&pier, &s.image, "").await;
    assert_eq!((status, filters), (200, None));
    assert_eq!(all.len(), 2);
    assert!(all.contains(&s.sig));
    // Filtered by pier, and said so.
    let (_, filters, sigs) = referrers(&pier, &s.image, &format!("?artifactType={SIG}")).await;
    assert_eq!(filters.as_deref(), Some("artifactType"));
    assert_eq!(sigs, vec![s.sig.clone()]);
    let (_, _, sboms) = referrers(&pier, &s.image, "?artifactType=application%2Fspdx%2Bjson").await;
    assert_eq!(sboms.len(), 1);
    // Kept within the window: one upstream request for all of the above.
    assert_eq!(up.count("/referrers/"), 1);
    // Offline: the kept answer, and what it lists by digest once fetched.
    let r = client()
        .get(format!("{}/v2/app/manifests/{}", pier.url, s.sig))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    up.set(|b| b.drop_connections = true);
    assert_eq!(referrers(&pier, &s.image, "").await.2, all);
    let r = client()
        .get(format!("{}/v2/app/manifests/{}", pier.url, s.sig))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn fallback_tag_when_the_upstream_has_no_referrers_api_else_an_empty_index() {
    let (up, pier, s) = setup(Behaviour::default(), Duration::from_secs(300)).await;
    // The fallback tag schema: an index under sha256-<hex>, kept up to date by the pusher.
    let fallback = format!(
        r#"{{"schemaVersion":2,"mediaType":"{INDEX}","manifests":[{{"mediaType":"{OCI}","digest":"{}","size":1,"artifactType":"{SIG}"}}]}}"#,
        s.sig
    );
    let tag = format!("sha256-{}", s.image.trim_start_matches("sha256:"));
    up.add_manifest("library/app", &tag, INDEX, &fallback);
    let (status, _, listed) = referrers(&pier, &s.image, "").await;
    assert_eq!((status, listed), (200, vec![s.sig.clone()]));
    assert!(up.count("/referrers/") >= 1 && up.count(&format!("/manifests/{tag}")) >= 1);
    // A digest nothing refers to: 200 with an empty index, not 404.
    let nothing = format!("sha256:{}", hex(&[7u8; 32]));
    let (status, _, listed) = referrers(&pier, &nothing, "").await;
    assert_eq!((status, listed.len()), (200, 0));
}

#[tokio::test]
async fn a_new_referrer_appears_once_the_window_has_passed() {
    let (up, pier, s) = setup(
        Behaviour {
            referrers_api: true,
            ..Behaviour::default()
        },
        Duration::ZERO,
    )
    .await;
    assert_eq!(referrers(&pier, &s.image, "").await.2.len(), 2);
    up.add_manifest(
        "library/app",
        "att-manifest",
        OCI,
        &format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI}","artifactType":"application/vnd.in-toto+json","layers":[],"subject":{{"mediaType":"{OCI}","digest":"{}","size":1}}}}"#,
            s.image
        ),
    );
    assert_eq!(referrers(&pier, &s.image, "").await.2.len(), 3);
    // With the upstream failing, the last answer stands in.
    up.set(|b| b.fail_status = Some(503));
    assert_eq!(referrers(&pier, &s.image, "").await.2.len(), 3);
}

#[tokio::test]
async fn attachment_tags_are_revalidated_even_when_they_match_immutable_tags() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let s = signed_image(&up);
    let sig_tag = format!("sha256-{}.sig", s.image.trim_start_matches("sha256:"));
    up.add_manifest("library/app", &sig_tag, OCI, r#"{"schemaVersion":2,"v":1}"#);
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.tag_ttl = Duration::ZERO;
    spec.immutable_tags = Some(regex::Regex::new(".*").unwrap());
    let pier = start(vec![spec], (1 << 20, 64 << 10)).await;
    for path in ["app/manifests/1", &format!("app/manifests/{sig_tag}")] {
        for _ in 0..2 {
            let r = client()
                .get(format!("{}/v2/{path}", pier.url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // An ordinary tag matching immutable_tags is never asked again; the signature tag is.
    assert_eq!(up.count("HEAD /v2/library/app/manifests/1"), 0);
    assert_eq!(
        up.count(&format!("HEAD /v2/library/app/manifests/{sig_tag}")),
        1
    );
    // A new signature moves the tag, and the client sees it.
    let moved = up.add_manifest("library/app", &sig_tag, OCI, r#"{"schemaVersion":2,"v":2}"#);
    let r = client()
        .get(format!("{}/v2/app/manifests/{sig_tag}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["docker-content-digest"], moved.as_str());
}

#[tokio::test]
async fn warm_brings_signatures_and_referrers_for_use_offline() {
    let (up, pier, s) = setup(
        Behaviour {
            referrers_api: true,
            ..Behaviour::default()
        },
        Duration::ZERO,
    )
    .await;
    // A cosign-style signature tag too.
    let sig_tag = format!("sha256-{}.sig", s.image.trim_start_matches("sha256:"));
    let cosign_layer = up.add_blob(b"cosign simple signing payload".to_vec());
    up.add_manifest(
        "library/app",
        &sig_tag,
        OCI,
        &format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI}","layers":[{{"digest":"{cosign_layer}","size":29}}]}}"#
        ),
    );
    let report = pier
        .mirror
        .warm("app:1", &WarmOptions::default(), &|_| {})
        .await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    // The image, the .sig tag's manifest, and the two referrers.
    assert_eq!(report.manifests, 4, "{report:?}");
    up.set(|b| b.drop_connections = true);
    let get = |path: String| {
        let url = format!("{}/v2/{path}", pier.url);
        async move { client().get(url).send().await.unwrap() }
    };
    let r = get(format!("app/manifests/{sig_tag}")).await;
    assert_eq!(r.status(), 200);
    let r = get(format!("app/blobs/{cosign_layer}")).await;
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        b"cosign simple signing payload"
    );
    assert_eq!(referrers(&pier, &s.image, "").await.2.len(), 2);
    assert_eq!(get(format!("app/manifests/{}", s.sig)).await.status(), 200);
    let r = get(format!("app/blobs/{}", s.sig_layer)).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"signature payload");
}

#[tokio::test]
async fn warm_without_signatures_leaves_them_out() {
    let (up, pier, _s) = setup(
        Behaviour {
            referrers_api: true,
            ..Behaviour::default()
        },
        Duration::ZERO,
    )
    .await;
    let options = WarmOptions {
        signatures: false,
        ..WarmOptions::default()
    };
    let report = pier.mirror.warm("app:1", &options, &|_| {}).await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.manifests, 1);
    assert_eq!(up.count("/referrers/"), 0);
    assert_eq!(up.count(".sig"), 0);
}

// ---- hostile probes ----

/// A referrers answer is the upstream's word on what refers to a digest, not on what a
/// repository holds: a digest it lists from another repository does not become fetchable here.
#[tokio::test]
async fn referrers_listing_another_repositorys_manifest_does_not_link_it() {
    let (up, pier, s) = setup(
        Behaviour {
            referrers_api: true,
            ..Behaviour::default()
        },
        Duration::from_secs(300),
    )
    .await;
    let secret = up.add_manifest(
        "library/secret",
        "1",
        OCI,
        r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[],"secret":true}"#,
    );
    // Someone allowed library/secret pulls it: pier holds it now.
    let r = client()
        .get(format!("{}/v2/secret/manifests/1", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    up.set(|b| b.referrers_also = vec![secret.clone()]);
    let (status, _, listed) = referrers(&pier, &s.image, "").await;
    assert_eq!(status, 200);
    assert!(listed.contains(&secret));
    // library/app does not hold it: asked by digest under app, pier must not hand it out.
    let r = client()
        .get(format!("{}/v2/app/manifests/{secret}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another repository's manifest leaked");
    // What app's referrers list and app holds is still served, offline too once fetched.
    let r = client()
        .get(format!("{}/v2/app/manifests/{}", pier.url, s.sig))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A subject digest that is not sha256: no fallback tag can name a sha512 digest (too long for
/// a tag), so an upstream without the referrers API means an empty index, not a server error.
#[tokio::test]
async fn referrers_of_a_sha512_digest_without_the_api() {
    let (_up, pier, _s) = setup(Behaviour::default(), Duration::from_secs(300)).await;
    let subject = format!("sha512:{}", "ab".repeat(64));
    let (status, _, listed) = referrers(&pier, &subject, "").await;
    assert_eq!((status, listed.len()), (200, 0));
}

/// Odd artifactType filters: empty, percent-encoded, repeated, with a parameter; an Accept
/// header the referrers API does not serve. Always an image index, filtered exactly.
#[tokio::test]
async fn referrers_odd_filters_and_accept_headers() {
    let (_up, pier, s) = setup(
        Behaviour {
            referrers_api: true,
            ..Behaviour::default()
        },
        Duration::from_secs(300),
    )
    .await;
    let sig = "application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson";
    for (query, expect) in [
        ("?artifactType=".to_string(), 0),
        (format!("?artifactType={sig}"), 1),
        (format!("?artifactType={sig}&artifactType={sig}"), 1),
        // Unencoded: a media type has no spaces, so '+' is itself, not a form-encoded space.
        ("?artifactType=application/spdx+json".to_string(), 1),
        ("?artifactType=%ZZ".to_string(), 0),
        (
            "?artifactType=application%2Fspdx%2Bjson%3Bcharset%3Dutf-8".to_string(),
            0,
        ),
    ] {
        let (status, filters, listed) = referrers(&pier, &s.image, &query).await;
        assert_eq!(status, 200, "{query}");
        assert_eq!(filters.as_deref(), Some("artifactType"), "{query}");
        assert_eq!(listed.len(), expect, "{query}: {listed:?}");
    }
    let r = client()
        .get(format!("{}/v2/app/referrers/{}", pier.url, s.image))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], INDEX);
}

/// With the upstream down, a signature tag pier never saw is absent (404), not a gateway error: a
/// client that looks for signatures of an unsigned image (podman with use-sigstore-attachments)
/// still pulls it when its policy accepts unsigned images. A signature pier holds is served.
#[tokio::test]
async fn an_unseen_signature_tag_is_absent_while_the_upstream_is_down() {
    let (up, pier, signed) = setup(Behaviour::default(), Duration::ZERO).await;
    let unsigned = up.add_manifest(
        "library/plain",
        "1",
        OCI,
        &format!(r#"{{"schemaVersion":2,"mediaType":"{OCI}","layers":[]}}"#),
    );
    let sig_tag = |d: &str| format!("sha256-{}.sig", d.trim_start_matches("sha256:"));
    // Cache both images and the signed one's signature tag (it points at the sig manifest).
    let sig_body = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI}","artifactType":"{SIG}","layers":[{{"digest":"{}","size":17}}],"subject":{{"mediaType":"{OCI}","digest":"{}","size":1}}}}"#,
        signed.sig_layer, signed.image
    );
    up.add_manifest("library/app", &sig_tag(&signed.image), OCI, &sig_body);
    let get = |path: String| {
        let url = format!("{}{path}", pier.url);
        async move {
            let r = client()
                .get(url)
                .header("accept", OCI)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    assert_eq!(get("/v2/plain/manifests/1".into()).await, 200);
    assert_eq!(
        get(format!("/v2/plain/manifests/{}", sig_tag(&unsigned))).await,
        404
    );
    assert_eq!(get("/v2/app/manifests/1".into()).await, 200);
    assert_eq!(
        get(format!("/v2/app/manifests/{}", sig_tag(&signed.image))).await,
        200
    );
    up.set(|b| b.drop_connections = true);
    // Online it was 404 from the upstream; offline pier says the same, not 502/503.
    assert_eq!(
        get(format!("/v2/plain/manifests/{}", sig_tag(&unsigned))).await,
        404
    );
    // A tag that is not an attachment is still a gateway error when nothing is cached.
    let other = get("/v2/plain/manifests/never-seen".into()).await;
    assert!(
        other >= 500,
        "an unknown ordinary tag offline answered {other}"
    );
    // The signature pier holds is served offline.
    assert_eq!(
        get(format!("/v2/app/manifests/{}", sig_tag(&signed.image))).await,
        200
    );
    let _ = signed.sig;
}
