//! Sigstore signatures through pier with real components (issue 16): an image signed with a key
//! the test generates, in the sigstore attachment format containers/image writes and verifies
//! (`sha256-<hex>.sig`: an OCI manifest whose layer is the simple-signing payload, with the
//! base64 ECDSA P-256 signature in the `dev.cosignproject.cosign/signature` annotation), pushed
//! with skopeo to a real Distribution registry, then pulled through pier under a policy.json that
//! requires it (`sigstoreSigned`, `use-sigstore-attachments: true`): online, and after `pier warm`
//! with the registry stopped. Unsigned, forged (another key) and moved (a valid signature of
//! another image) are refused.
//!
//! Debian's skopeo and podman (containers/image 5.23 with Debian's disable-sigstore.patch) can
//! neither sign nor verify sigstore signatures: signing fails, and so does checking a signature
//! once found ("Debian-local change: sigstore disabled"). So the test signs itself (`ring`), and
//! the checks are split: skopeo under the policy fetches the attachment through pier (and, where
//! containers/image is built with sigstore, verifies it); refusing an unsigned image is the
//! policy's own work on every build; and the cryptographic check is done here, in cosign's and
//! containers/image's rules, on what pier serves: the manifest by tag, the `.sig` manifest, the
//! payload blob.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, KeyPair as _};

use crate::support::image::{self, sha256_hex, OCI_CONFIG, OCI_MANIFEST};
use crate::support::process::{
    path_str, pier, push_image, registry, registry_requests, skopeo, skopeo_try,
};
use crate::support::require;

const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const PAYLOAD_TYPE: &str = "cosign container image signature";
/// What containers/image 5.23 as patched by Debian says when it meets a sigstore signature.
const DEBIAN_DISABLED: &str = "sigstore disabled";

/// An ECDSA P-256 signing key.
struct Key {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Key {
    fn generate() -> Key {
        let rng = SystemRandom::new();
        let alg = &sig::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generate key");
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("load key");
        Key { pair, rng }
    }

    /// The public key as policy.json's `keyPath` wants it: PEM "PUBLIC KEY" (SubjectPublicKeyInfo).
    fn public_pem(&self) -> String {
        // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING { uncompressed point } }
        let mut der = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        der.extend_from_slice(self.pair.public_key().as_ref());
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    fn sign(&self, payload: &[u8]) -> String {
        let s = self.pair.sign(&self.rng, payload).expect("sign");
        base64::engine::general_purpose::STANDARD.encode(s.as_ref())
    }
}

/// The simple-signing payload containers/image signs: `identity` signed for `digest`.
fn payload(identity: &str, digest: &str) -> Vec<u8> {
    serde_json::json!({
        "critical": {
            "identity": { "docker-reference": identity },
            "image": { "docker-manifest-digest": digest },
            "type": PAYLOAD_TYPE,
        },
        "optional": { "creator": "pier e2e test" },
    })
    .to_string()
    .into_bytes()
}

/// Writes the attachment for `digest` into a new OCI layout `layout`, tagged with its attachment
/// tag, as containers/image's sigstore attachment writer lays it out; returns the tag.
fn attachment(layout: &Path, digest: &str, payload: &[u8], signature: &str) -> String {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |data: &[u8]| {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).expect("write blob");
        format!("sha256:{hex}")
    };
    let payload_digest = put(payload);
    let config = serde_json::json!({
        "architecture": "", "os": "", "config": {},
        "rootfs": { "type": "layers", "diff_ids": [payload_digest] },
    })
    .to_string();
    let config_digest = put(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{
            "mediaType": SIMPLE_SIGNING,
            "digest": payload_digest,
            "size": payload.len(),
            "annotations": { SIGNATURE_ANNOTATION: signature },
        }],
    })
    .to_string();
    let manifest_digest = put(manifest.as_bytes());
    let tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len(),
        "annotations": { "org.opencontainers.image.ref.name": tag },
    }]});
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    tag
}

/// Signs `digest` as `identity` with `key` and pushes the attachment to `repo` (`host/name`).
fn push_signature(tmp: &Path, repo: &str, identity: &str, digest: &str, key: &Key) {
    let p = payload(identity, digest);
    push_attachment(tmp, repo, digest, &p, &key.sign(&p));
}

fn push_attachment(tmp: &Path, repo: &str, digest: &str, payload: &[u8], signature: &str) {
    let layout = tmp.join(format!("att-{}", &digest[7..19]));
    let tag = attachment(&layout, digest, payload, signature);
    // --preserve-digests: byte for byte, annotations included, or fail.
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &format!("oci:{}:{tag}", path_str(&layout)),
        &format!("docker://{repo}:{tag}"),
    ]);
}

/// policy.json requiring a sigstore signature by `public_key` for images pulled from pier at
/// `mirror` (signed as docker.io/...), and a registries.d reading sigstore attachments there.
fn trust(dir: &Path, mirror: &str, public_key: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let policy = dir.join("policy.json");
    let requirement = serde_json::json!([{
        "type": "sigstoreSigned",
        "keyPath": path_str(public_key),
        "signedIdentity": { "type": "remapIdentity", "prefix": mirror, "signedPrefix": "docker.io" },
    }]);
    let doc = serde_json::json!({
        "default": [{ "type": "reject" }],
        "transports": { "docker": { mirror: requirement } },
    });
    std::fs::write(&policy, doc.to_string()).expect("policy.json");
    let registries_d = dir.join("registries.d");
    std::fs::create_dir_all(&registries_d).expect("mkdir registries.d");
    std::fs::write(
        registries_d.join("pier.yaml"),
        format!("docker:\n  {mirror}:\n    use-sigstore-attachments: true\n"),
    )
    .expect("registries.d");
    (policy, registries_d)
}

/// A policy that accepts any image from pier at `mirror`, with the same registries.d (skopeo
/// still looks for sigstore attachments there).
fn lenient(dir: &Path, mirror: &str) -> (PathBuf, PathBuf) {
    let (policy, registries_d) = trust(dir, mirror, Path::new("/nonexistent"));
    let doc = serde_json::json!({ "default": [{ "type": "insecureAcceptAnything" }] });
    std::fs::write(&policy, doc.to_string()).expect("policy.json");
    (policy, registries_d)
}

/// What skopeo made of a pull under the policy.
#[derive(Debug, PartialEq)]
enum Pull {
    /// Pulled: the signature verified (a containers/image built with sigstore).
    Accepted,
    /// The signature was found and fetched through pier, and this build cannot check it.
    FoundUnverifiable,
    /// Refused, with skopeo's message.
    Refused(String),
}

fn pull(mirror: &str, trust: &(PathBuf, PathBuf), name: &str, out: &Path) -> Pull {
    let o = skopeo_try(&[
        "copy",
        "--policy",
        &path_str(&trust.0),
        "--registries.d",
        &path_str(&trust.1),
        "--src-tls-verify=false",
        &format!("docker://{mirror}/library/{name}"),
        &format!("oci:{}:x", path_str(out)),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    if o.status.success() {
        Pull::Accepted
    } else if err.contains(DEBIAN_DISABLED) {
        Pull::FoundUnverifiable
    } else {
        Pull::Refused(err)
    }
}

/// Verifies `name`'s sigstore signature as served by pier at `mirror`, by containers/image's
/// rules for `sigstoreSigned`: the manifest's digest by tag, its `.sig` attachment, each
/// simple-signing layer's payload checked against the annotation's signature with `public_key`,
/// then the payload's type, digest and identity. Ok when one signature is valid.
fn verify_through(mirror: &str, name: &str, public_key: &[u8]) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let http = reqwest::Client::new();
        let (repo, tag) = name.split_once(':').expect("name:tag");
        let get = |path: String| {
            let req = http
                .get(format!("http://{mirror}/v2/library/{repo}/{path}"))
                .header("accept", OCI_MANIFEST);
            async move {
                let r = req.send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("{path}: {}", r.status()));
                }
                r.bytes().await.map_err(|e| e.to_string())
            }
        };
        let manifest = get(format!("manifests/{tag}")).await?;
        let digest = format!("sha256:{}", sha256_hex(&manifest));
        let att = get(format!("manifests/sha256-{}.sig", &digest[7..]))
            .await
            .map_err(|e| format!("no signature: {e}"))?;
        let att: serde_json::Value = serde_json::from_slice(&att).map_err(|e| e.to_string())?;
        let key = sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_ASN1, public_key);
        let mut why = Vec::new();
        for layer in att["layers"].as_array().into_iter().flatten() {
            if layer["mediaType"] != SIMPLE_SIGNING {
                continue;
            }
            let blob = get(format!("blobs/{}", layer["digest"].as_str().unwrap_or(""))).await?;
            let signature = base64::engine::general_purpose::STANDARD
                .decode(
                    layer["annotations"][SIGNATURE_ANNOTATION]
                        .as_str()
                        .unwrap_or(""),
                )
                .map_err(|e| e.to_string())?;
            if key.verify(&blob, &signature).is_err() {
                why.push("signature does not verify".to_string());
                continue;
            }
            let p: serde_json::Value = serde_json::from_slice(&blob).map_err(|e| e.to_string())?;
            let critical = &p["critical"];
            if critical["type"] != PAYLOAD_TYPE {
                why.push("wrong payload type".into());
            } else if critical["image"]["docker-manifest-digest"] != digest.as_str() {
                why.push("signed for another digest".into());
            } else if critical["identity"]["docker-reference"]
                != format!("docker.io/library/{name}")
            {
                why.push("signed for another identity".into());
            } else {
                return Ok(());
            }
        }
        Err(format!("no valid signature: {why:?}"))
    })
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn pier_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(crate::support::pier_bin())
        .args(args)
        .output()
        .expect("run pier");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn signed_images_verify_through_pier_online_and_after_warm_offline() {
    if !require(&["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let key = Key::generate();
    let public_key = t.join("key.pub");
    std::fs::write(&public_key, key.public_pem()).expect("write public key");
    let public = key.pair.public_key().as_ref().to_vec();

    let registry_dir = t.join("registry");
    let mut upstream = registry(&registry_dir);
    let repo = format!("{}/library/app", upstream.addr);
    // app:1.0 signed; app:unsigned not; app:forged signed by another key; app:moved carries
    // app:1.0's valid signature (signed for app:1.0's digest) as its own.
    let mut digests = std::collections::HashMap::new();
    for name in ["1.0", "unsigned", "forged", "moved"] {
        let layout = t.join(format!("img-{name}"));
        let img = image::single_image(&layout, name, &[20_000]);
        push_image(&layout, name, &format!("{repo}:{name}"), false);
        digests.insert(name, img.top.digest);
    }
    push_signature(t, &repo, "docker.io/library/app:1.0", &digests["1.0"], &key);
    let attacker = Key::generate();
    push_signature(
        t,
        &repo,
        "docker.io/library/app:forged",
        &digests["forged"],
        &attacker,
    );
    let stolen = payload("docker.io/library/app:1.0", &digests["1.0"]);
    push_attachment(t, &repo, &digests["moved"], &stolen, &key.sign(&stolen));

    let config = t.join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  - name: docker.io\n    url: http://{}\n    tag_ttl: 0s\n",
            upstream.addr
        ),
    )
    .expect("config");
    let cli = |cache: &Path| {
        vec![
            "--config".to_string(),
            path_str(&config),
            "--cache-dir".to_string(),
            path_str(cache),
        ]
    };

    // Online, through a pier with an empty cache.
    let online_cache = t.join("cache-online");
    let online = pier(&strs(&cli(&online_cache)));
    let policy = trust(&t.join("trust-online"), &online.addr, &public_key);
    let first = pull(&online.addr, &policy, "app:1.0", &t.join("out1"));
    assert!(
        matches!(first, Pull::Accepted | Pull::FoundUnverifiable),
        "the signed image was refused through pier: {first:?}"
    );
    let sig_tag = format!("sha256-{}.sig", &digests["1.0"][7..]);
    assert!(
        registry_requests(&registry_dir)
            .iter()
            .any(|r| r.contains(&format!("/manifests/{sig_tag}"))),
        "pier never asked the upstream for the signature"
    );
    let unsigned = pull(&online.addr, &policy, "app:unsigned", &t.join("out2"));
    assert!(
        matches!(&unsigned, Pull::Refused(e) if e.contains("A signature was required, but no signature exists")),
        "{unsigned:?}"
    );
    for name in ["app:forged", "app:moved"] {
        let p = pull(&online.addr, &policy, name, &t.join("out3"));
        assert!(p != Pull::Accepted, "{name} was accepted");
    }
    assert_eq!(verify_through(&online.addr, "app:1.0", &public), Ok(()));
    let e = verify_through(&online.addr, "app:unsigned", &public).unwrap_err();
    assert!(e.starts_with("no signature"), "{e}");
    let e = verify_through(&online.addr, "app:forged", &public).unwrap_err();
    assert!(e.contains("signature does not verify"), "{e}");
    let e = verify_through(&online.addr, "app:moved", &public).unwrap_err();
    assert!(e.contains("signed for another digest"), "{e}");
    // The forged one is valid under the attacker's key: what refuses it is the key alone.
    let attacker_public = attacker.pair.public_key().as_ref().to_vec();
    assert_eq!(
        verify_through(&online.addr, "app:forged", &attacker_public),
        Ok(())
    );
    drop(online);

    // `pier warm` into a fresh, stopped cache directory, signatures on (the default); a second
    // cache warmed without them is the control.
    let warm_cache = t.join("cache-warm");
    let bare_cache = t.join("cache-bare");
    let images = ["app:1.0", "app:unsigned", "app:forged", "app:moved"];
    let warm = |cache: &Path, extra: &[&str]| {
        let args: Vec<String> = ["warm"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .chain(cli(cache))
            .collect();
        let (ok, text) = pier_cli(&strs(&args));
        assert!(ok, "{text}");
    };
    warm(&warm_cache, &images);
    warm(&bare_cache, &["--no-signatures", "app:1.0"]);

    upstream.stop();

    let offline = pier(&strs(&cli(&warm_cache)));
    let policy = trust(&t.join("trust-offline"), &offline.addr, &public_key);
    let p = pull(&offline.addr, &policy, "app:1.0", &t.join("out4"));
    assert!(
        matches!(p, Pull::Accepted | Pull::FoundUnverifiable),
        "offline, the signed image was refused: {p:?}"
    );
    if p == Pull::Accepted {
        assert!(
            first == Pull::Accepted,
            "a build that verifies online verifies offline"
        );
    }
    assert_eq!(verify_through(&offline.addr, "app:1.0", &public), Ok(()));
    // Refused by the policy itself, as online: offline, pier answers the `.sig` tag it never saw
    // as absent (404), not with a gateway error.
    let unsigned = pull(&offline.addr, &policy, "app:unsigned", &t.join("out5"));
    assert!(
        matches!(&unsigned, Pull::Refused(e) if e.contains("A signature was required, but no signature exists")),
        "{unsigned:?}"
    );
    // Under a policy that accepts unsigned images it pulls offline, though skopeo looks for its
    // signatures through pier.
    let any = lenient(&t.join("lenient-offline"), &offline.addr);
    let unsigned = pull(&offline.addr, &any, "app:unsigned", &t.join("out7"));
    assert_eq!(unsigned, Pull::Accepted);
    for name in ["app:forged", "app:moved"] {
        let p = pull(&offline.addr, &policy, name, &t.join("out6"));
        assert!(p != Pull::Accepted, "{name} was accepted offline");
    }
    assert!(verify_through(&offline.addr, "app:unsigned", &public).is_err());
    let e = verify_through(&offline.addr, "app:forged", &public).unwrap_err();
    assert!(e.contains("signature does not verify"), "{e}");
    let e = verify_through(&offline.addr, "app:moved", &public).unwrap_err();
    assert!(e.contains("signed for another digest"), "{e}");
    drop(offline);

    // Warmed without signatures: the image is there, its signature is not, and the policy
    // refuses it offline.
    let bare = pier(&strs(&cli(&bare_cache)));
    let policy = trust(&t.join("trust-bare"), &bare.addr, &public_key);
    let p = pull(&bare.addr, &policy, "app:1.0", &t.join("out7"));
    assert!(matches!(p, Pull::Refused(_)), "{p:?}");
    let e = verify_through(&bare.addr, "app:1.0", &public).unwrap_err();
    assert!(e.starts_with("no signature"), "{e}");
}
