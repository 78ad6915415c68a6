//! Every client gets the manifest it asked for: a tag's answer depends on the client's Accept
//! (an index for multi-platform clients, the linux/amd64 manifest for clients that take no index,
//! as Docker Hub and the Distribution registry negotiate), online and offline, in either order.

use std::time::Duration;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, start, Pier, UpstreamSpec};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI: &str = "application/vnd.oci.image.manifest.v1+json";

/// What the Docker daemon and containerd send: every modern type.
const MULTI: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

struct Image {
    index: String,
    amd64: String,
    arm64: String,
}

/// A multi-platform tag `library/multi:latest`: a Docker manifest list of two v2 manifests.
fn multi_platform(up: &FakeUpstream) -> Image {
    let amd64 = up.add_manifest(
        "library/multi",
        "amd64-only",
        V2,
        r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"digest":"sha256:aaaa"},"arch":"amd64"}"#,
    );
    let arm64 = up.add_manifest(
        "library/multi",
        "arm64-only",
        V2,
        r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"digest":"sha256:bbbb"},"arch":"arm64"}"#,
    );
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"{LIST}","manifests":[
        {{"mediaType":"{V2}","digest":"{arm64}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
        {{"mediaType":"{V2}","digest":"{amd64}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
    );
    let index = up.add_manifest("library/multi", "latest", LIST, &list);
    Image {
        index,
        amd64,
        arm64,
    }
}

async fn setup() -> (FakeUpstream, Pier, Image) {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let image = multi_platform(&up);
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    // A long window: a wrong answer kept for it would be served for the whole window.
    spec.tag_ttl = Duration::from_secs(300);
    spec.read_timeout = Duration::from_millis(500);
    let pier = start(vec![spec], (1 << 20, 64 << 10)).await;
    (up, pier, image)
}

/// GET a manifest with this Accept: status, content type and digest.
async fn get(pier: &Pier, reference: &str, accept: &str) -> (u16, String, String) {
    let r = client()
        .get(format!("{}/v2/multi/manifests/{reference}", pier.url))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let header = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (t, d) = (header("content-type"), header("docker-content-digest"));
    (status, t, d)
}

fn go_offline(up: &FakeUpstream) {
    up.set(|b| b.drop_connections = true);
}

#[tokio::test]
async fn single_manifest_client_first_then_multi_platform_client() {
    let (up, pier, image) = setup().await;
    // An old client that takes no index gets the linux/amd64 manifest.
    assert_eq!(
        get(&pier, "latest", V2).await,
        (200, V2.into(), image.amd64.clone())
    );
    // A multi-platform client gets the index, not the amd64 answer kept for the other client,
    // although that answer is well within its window.
    assert_eq!(
        get(&pier, "latest", MULTI).await,
        (200, LIST.into(), image.index.clone())
    );
    // Each answer is now kept for its own accept set: no further upstream request.
    let asked = up.count("/manifests/latest");
    assert_eq!(get(&pier, "latest", V2).await.2, image.amd64);
    assert_eq!(get(&pier, "latest", MULTI).await.2, image.index);
    assert_eq!(up.count("/manifests/latest"), asked);
    // Docker's several Accept headers, in another order, are the same set.
    let r = client()
        .get(format!("{}/v2/multi/manifests/latest", pier.url))
        .header("accept", V2)
        .header("accept", LIST)
        .header("accept", OCI)
        .header("accept", INDEX)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["docker-content-digest"], image.index.as_str());
    assert_eq!(up.count("/manifests/latest"), asked);
    // Offline, each client still gets its own answer.
    go_offline(&up);
    assert_eq!(get(&pier, "latest", MULTI).await.2, image.index);
    assert_eq!(get(&pier, "latest", V2).await.2, image.amd64);
}

#[tokio::test]
async fn multi_platform_client_first_then_single_manifest_client() {
    let (up, pier, image) = setup().await;
    assert_eq!(
        get(&pier, "latest", MULTI).await,
        (200, LIST.into(), image.index.clone())
    );
    // An arm64 node pulls its platform by digest.
    assert_eq!(get(&pier, &image.arm64, MULTI).await.2, image.arm64);
    // The single-manifest client is not handed the index: pier asks the upstream with the
    // client's own Accept (a HEAD first), and gets the amd64 manifest.
    let heads_before = up.count("HEAD /v2/library/multi/manifests/latest");
    assert_eq!(
        get(&pier, "latest", V2).await,
        (200, V2.into(), image.amd64.clone())
    );
    assert_eq!(
        up.count("HEAD /v2/library/multi/manifests/latest"),
        heads_before + 1
    );
    // Both answers kept; the multi-platform client still gets the index.
    assert_eq!(get(&pier, "latest", MULTI).await.2, image.index);
    go_offline(&up);
    assert_eq!(get(&pier, "latest", V2).await.2, image.amd64);
    assert_eq!(get(&pier, "latest", MULTI).await.2, image.index);
}

#[tokio::test]
async fn offline_a_client_gets_the_best_cached_answer_it_accepts_and_never_another() {
    let (up, pier, image) = setup().await;
    // Only a multi-platform client pulled (index and the amd64 manifest, by digest).
    assert_eq!(get(&pier, "latest", MULTI).await.2, image.index);
    assert_eq!(get(&pier, &image.amd64, MULTI).await.2, image.amd64);
    go_offline(&up);
    // A client that takes no index gets the cached index's linux/amd64 manifest, as the
    // upstream would have chosen for it.
    assert_eq!(
        get(&pier, "latest", V2).await,
        (200, V2.into(), image.amd64.clone())
    );
    // A client that takes only OCI image manifests accepts neither the list nor the Docker v2
    // manifests: it gets an error, never a manifest it cannot read.
    let (status, content_type, _) = get(&pier, "latest", OCI).await;
    assert!(status >= 500, "got {status} {content_type}");
    // A client that takes the list but no v2 manifest: the list (what the upstream answered
    // for a set that includes it).
    let (status, t, d) = get(&pier, "latest", &format!("{LIST}, {OCI}")).await;
    assert_eq!(
        (status, t.as_str(), d.as_str()),
        (200, LIST, image.index.as_str())
    );
}
