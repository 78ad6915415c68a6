//! skopeo pulls through pier over HTTPS, trusting a CA the test generates: with client
//! authentication off (pier ignores the credentials a client offers unasked) and on (skopeo's
//! --creds through pier's token flow).

use crate::support::image;
use crate::support::process::{path_str, pier, push_image, registry, skopeo, skopeo_try};
use crate::support::require;

#[test]
fn skopeo_pulls_over_https_with_a_private_ca() {
    if !require(&["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // A CA, and a certificate for 127.0.0.1 it signed.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    std::fs::write(certs.join("ca.crt"), ca.pem()).expect("ca");
    std::fs::write(tmp.path().join("tls.pem"), cert.pem()).expect("cert");
    std::fs::write(tmp.path().join("tls.key"), key.serialize_pem()).expect("key");

    let layout = tmp.path().join("src");
    image::single_image(&layout, "1", &[200_000]);
    let upstream = registry(&tmp.path().join("registry"));
    push_image(
        &layout,
        "1",
        &format!("{}/library/app:1", upstream.addr),
        false,
    );
    let config = tmp.path().join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "tls:\n  cert: {}\n  key: {}\nupstreams:\n  - name: docker.io\n    url: http://{}\n",
            path_str(&tmp.path().join("tls.pem")),
            path_str(&tmp.path().join("tls.key")),
            upstream.addr
        ),
    )
    .expect("config");
    let mirror = pier(&[
        "--config",
        &path_str(&config),
        "--cache-dir",
        &path_str(&tmp.path().join("cache")),
    ]);

    let src = format!("docker://{}/library/app:1", mirror.addr);
    let certs = path_str(&certs);
    for (i, creds) in [None, Some("someone:their-hub-password")]
        .into_iter()
        .enumerate()
    {
        let dest = format!("oci:{}:1", path_str(&tmp.path().join(format!("out{i}"))));
        let mut args = vec!["copy", "--src-cert-dir", &certs, "--src-tls-verify=true"];
        if let Some(c) = creds {
            args.extend(["--src-creds", c]);
        }
        args.extend([src.as_str(), dest.as_str()]);
        skopeo(&args);
        assert!(image::blobs(&tmp.path().join(format!("out{i}"))) == image::blobs(&layout));
    }
    // With client authentication on, skopeo needs --creds: it follows pier's token flow.
    std::fs::write(
        tmp.path().join("htpasswd"),
        format!("alice:{}\n", bcrypt::hash("alice-pw", 4).expect("bcrypt")),
    )
    .expect("htpasswd");
    let auth_config = tmp.path().join("auth.yaml");
    std::fs::write(
        &auth_config,
        format!(
            "tls:\n  cert: {}\n  key: {}\nauth:\n  htpasswd: {}\nupstreams:\n  - name: docker.io\n    url: http://{}\n",
            path_str(&tmp.path().join("tls.pem")),
            path_str(&tmp.path().join("tls.key")),
            path_str(&tmp.path().join("htpasswd")),
            upstream.addr
        ),
    )
    .expect("config");
    let guarded = pier(&[
        "--config",
        &path_str(&auth_config),
        "--cache-dir",
        &path_str(&tmp.path().join("cache2")),
    ]);
    let src2 = format!("docker://{}/library/app:1", guarded.addr);
    let out = skopeo_try(&["inspect", "--cert-dir", &certs, "--tls-verify=true", &src2]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && (err.contains("401")
                || err.contains("unauthorized")
                || err.contains("authentication required")),
        "pulled without credentials: {err}"
    );
    let dest = format!("oci:{}:1", path_str(&tmp.path().join("out-auth")));
    skopeo(&[
        "copy",
        "--src-cert-dir",
        &certs,
        "--src-tls-verify=true",
        "--src-creds",
        "alice:alice-pw",
        &src2,
        &dest,
    ]);
    assert!(image::blobs(&tmp.path().join("out-auth")) == image::blobs(&layout));
    let out = skopeo_try(&[
        "inspect",
        "--cert-dir",
        &certs,
        "--creds",
        "alice:wrong",
        &src2,
    ]);
    assert!(!out.status.success(), "pulled with a wrong password");

    // Without the CA, the certificate is not trusted: TLS is really on.
    let out = skopeo_try(&["inspect", "--tls-verify=true", &src]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("certificate"),
        "pier's certificate was trusted without its CA: {err}"
    );
}
