//! Hosted repositories against hostile users: other users' upload sessions, mounts from what
//! the caller may not pull, tokens and pull-only users, manifests naming other repositories'
//! content, garbage collection racing pushes and deletes, and bad upload ranges.

use std::time::Duration;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, settle, Pier};

use crate::pushing::{
    as_user, blob_file, digest_of, header, image_manifest, push_blob, put_manifest, start,
    start_with_users, upload_data, upload_dirs, users, OCI_INDEX, OCI_MANIFEST,
};

fn index_of(child: &str, size: usize) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{child}","size":{size}}}]}}"#
    )
}

async fn start_session(pier: &Pier, user: Option<&str>, repo: &str) -> String {
    let r = as_user(
        client().post(format!("{}/v2/{repo}/blobs/uploads/", pier.url)),
        user,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 202, "{repo}");
    header(&r, "location")
}

#[tokio::test]
async fn another_users_upload_session_is_out_of_reach() {
    let (_dir, _up, pier) = start_with_users().await;
    let c = client();
    let location = start_session(&pier, Some("alice"), "team/a").await;
    let uuid = location.rsplit('/').next().unwrap().to_string();
    let at = format!("{}{location}", pier.url);
    let r = c
        .patch(&at)
        .basic_auth("alice", Some("pw"))
        .body(b"alice's ".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // bob (no push rule) and carol (push on local/* only), even knowing the Location.
    for user in ["bob", "carol"] {
        for method in ["PATCH", "PUT", "GET", "DELETE"] {
            let url = if method == "PUT" {
                format!("{at}?digest={}", digest_of(b"alice's evil"))
            } else {
                at.clone()
            };
            let r = c
                .request(method.parse().unwrap(), url)
                .basic_auth(user, Some("pw"))
                .body(if method == "GET" || method == "DELETE" {
                    Vec::new()
                } else {
                    b"evil".to_vec()
                })
                .send()
                .await
                .unwrap();
            if user == "bob" && method == "GET" {
                // See `a_user_who_may_only_pull_cannot_read_an_upload_session`.
                continue;
            }
            assert_eq!(r.status(), 403, "{user} {method}");
        }
        // Anonymous: challenged.
        let r = c.patch(&at).body(b"evil".to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 401, "anonymous PATCH");
    }
    // carol through a repository she may push to, with alice's session id: unknown there.
    let theirs = format!("{}/v2/local/x/blobs/uploads/{uuid}", pier.url);
    for method in ["PATCH", "PUT", "GET", "DELETE"] {
        let url = if method == "PUT" {
            format!("{theirs}?digest={}", digest_of(b"alice's "))
        } else {
            theirs.clone()
        };
        let r = c
            .request(method.parse().unwrap(), url)
            .basic_auth("carol", Some("pw"))
            .send()
            .await
            .unwrap();
        // Every request on an upload session is part of a push, which carol may do in local/x:
        // the session is simply not there.
        assert_eq!(r.status(), 404, "carol {method} via local/x");
        assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    }
    // alice may not finish her own session into another repository either (not hers: 404).
    let r = c
        .put(format!(
            "{}/v2/team/b/blobs/uploads/{uuid}?digest={}",
            pier.url,
            digest_of(b"alice's ")
        ))
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // Her session is untouched, and finishes where it was started.
    let r = c
        .get(&at)
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-7");
    let whole = b"alice's blob";
    let r = c
        .put(format!("{at}?digest={}", digest_of(whole)))
        .basic_auth("alice", Some("pw"))
        .body(b"blob".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .get(format!("{}/v2/team/b/blobs/{}", pier.url, digest_of(whole)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "not linked to team/b");
}

#[tokio::test]
async fn mounts_need_pull_on_the_source_a_link_there_and_push_on_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    let mirrored = up.add_blob_in("other/thing", vec![7u8; 5_000]);
    let pier = start(
        &up,
        Some(users(dir.path())),
        Default::default(),
        vec![],
        None,
    )
    .await;
    let c = client();
    // alice pulls other/thing's blob through the mirror, and pushes one to team/secret.
    let r = c
        .get(format!("{}/v2/other/thing/blobs/{mirrored}", pier.url))
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 5_000);
    settle(&pier).await;
    let secret = push_blob(&pier, Some("alice"), "team/secret", b"team secret layer").await;
    let mount = |repo: &str, digest: &str, from: &str, user: &str| {
        c.post(format!(
            "{}/v2/{repo}/blobs/uploads/?mount={digest}&from={from}",
            pier.url
        ))
        .basic_auth(user, Some("pw"))
        .send()
    };
    // carol may pull neither team/secret nor docker.io/other/thing: a session, not a mount.
    for (digest, from) in [(&secret, "team/secret"), (&mirrored, "other/thing")] {
        let r = mount("local/x", digest, from, "carol").await.unwrap();
        assert_eq!(r.status(), 202, "carol mounting from {from}");
        assert!(header(&r, "location").starts_with("/v2/local/x/blobs/uploads/"));
    }
    for digest in [&secret, &mirrored] {
        let r = c
            .get(format!("{}/v2/local/x/blobs/{digest}", pier.url))
            .basic_auth("carol", Some("pw"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{digest} not in local/x");
    }
    // A digest in the store but linked only to another repository: not mountable from team/b.
    let r = mount("team/c", &secret, "team/b", "alice").await.unwrap();
    assert_eq!(r.status(), 202);
    let r = mount("team/c", &mirrored, "library/base", "alice")
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // A mount into a repository the caller may not push: refused, nothing linked.
    for user in ["bob", "carol", "erin"] {
        let r = mount("team/c", &secret, "team/secret", user).await.unwrap();
        assert_eq!(r.status(), 403, "{user}");
    }
    let r = c
        .post(format!(
            "{}/v2/team/c/blobs/uploads/?mount={secret}&from=team/secret",
            pier.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "anonymous");
    let r = c
        .get(format!("{}/v2/team/c/blobs/{secret}", pier.url))
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // alice may: the mount works.
    let r = mount("team/c", &secret, "team/secret", "alice")
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn a_mount_from_a_denied_upstream_repository_is_an_upload() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let blob = up.add_blob_in("library/secret", vec![9u8; 4_000]);
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let r = client()
        .get(format!("{}/v2/library/secret/blobs/{blob}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 4_000);
    settle(&pier).await;
    let dir = pier.stop().await;
    // Now denied: what was cached of it is out of reach, mounts included.
    let pier = start(
        &up,
        None,
        Default::default(),
        vec!["library/secret".into()],
        Some(dir),
    )
    .await;
    let r = client()
        .get(format!("{}/v2/library/secret/blobs/{blob}", pier.url))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    for from in ["library/secret", "secret", "docker.io/library/secret"] {
        let r = client()
            .post(format!(
                "{}/v2/team/app/blobs/uploads/?mount={blob}&from={from}",
                pier.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "from={from}");
    }
    let r = client()
        .get(format!("{}/v2/team/app/blobs/{blob}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn tokens_and_pull_only_users_push_and_delete_nothing_else() {
    let (_dir, _up, pier) = start_with_users().await;
    let c = client();
    let token_for = |user: &str, scope: &str| {
        c.get(format!(
            "{}/auth/token?service=pier&scope=repository:{scope}",
            pier.url
        ))
        .basic_auth(user, Some("pw"))
        .send()
    };
    let v: serde_json::Value = token_for("dave", "team/a:pull,push")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let r = c
        .post(format!("{}/v2/team/a/blobs/uploads/", pier.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "the token pushes where it was granted");
    for repo in ["team/b", "team/a/sub", "local/x"] {
        let r = c
            .post(format!("{}/v2/{repo}/blobs/uploads/", pier.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 401 || r.status() == 403,
            "{repo}: {}",
            r.status()
        );
    }
    // A token asked for team/b by dave (no rule there) grants no push on it.
    let v: serde_json::Value = token_for("dave", "team/b:pull,push")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let r = c
        .post(format!("{}/v2/team/b/blobs/uploads/", pier.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(r.status() == 401 || r.status() == 403, "{}", r.status());

    // alice pushes team/b:1.0; erin (pull only), dave (push, no delete), bob and anonymous
    // clients may not delete it, by tag or by digest.
    let config = push_blob(&pier, Some("alice"), "team/b", b"{}").await;
    let layer = push_blob(&pier, Some("alice"), "team/b", b"layer").await;
    let manifest = image_manifest(&config, &[&layer]);
    let r = put_manifest(
        &pier,
        Some("alice"),
        "team/b",
        "1.0",
        OCI_MANIFEST,
        &manifest,
    )
    .await;
    assert_eq!(r.status(), 201);
    let md = digest_of(manifest.as_bytes());
    for user in [Some("erin"), Some("dave"), Some("bob"), Some("carol"), None] {
        for reference in ["1.0", md.as_str()] {
            let r = as_user(
                c.delete(format!("{}/v2/team/b/manifests/{reference}", pier.url)),
                user,
            )
            .send()
            .await
            .unwrap();
            let want = if user.is_some() { 403 } else { 401 };
            assert_eq!(r.status(), want, "{user:?} {reference}");
        }
    }
    // dave on team/a may push but not delete.
    let r = c
        .delete(format!("{}/v2/team/a/manifests/latest", pier.url))
        .basic_auth("dave", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // erin's token asked with delete grants none.
    let v: serde_json::Value = token_for("erin", "team/b:pull,push,delete")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let r = c
        .delete(format!("{}/v2/team/b/manifests/1.0", pier.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(r.status() == 401 || r.status() == 403, "{}", r.status());
    let r = c
        .get(format!("{}/v2/team/b/manifests/1.0", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still there");
    assert_eq!(header(&r, "docker-content-digest"), md);
}

#[tokio::test]
async fn manifests_are_checked_against_this_repository_and_their_own_claims() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let c = client();
    let config = push_blob(&pier, None, "team/a", b"{\"a\":1}").await;
    let layer = push_blob(&pier, None, "team/a", b"a's layer").await;
    let manifest = image_manifest(&config, &[&layer]);
    let r = put_manifest(&pier, None, "team/a", "1.0", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    let md = digest_of(manifest.as_bytes());
    // team/b: the same blobs are in the store but not linked there.
    let r = put_manifest(&pier, None, "team/b", "1.0", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    // Only the config is team/b's: the layer still is not.
    let own_config = push_blob(&pier, None, "team/b", b"{\"a\":1}").await;
    assert_eq!(own_config, config);
    let r = put_manifest(&pier, None, "team/b", "1.0", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    // An index in team/b whose child manifest is only team/a's.
    let index = index_of(&md, manifest.len());
    let r = put_manifest(&pier, None, "team/b", "multi", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    // Even with the child's blobs linked to team/b, the child manifest is not.
    push_blob(&pier, None, "team/b", b"a's layer").await;
    let r = put_manifest(&pier, None, "team/b", "multi", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    // Content-Type disagreeing with mediaType, both ways.
    let r = put_manifest(&pier, None, "team/a", "2.0", OCI_INDEX, &manifest).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let r = put_manifest(&pier, None, "team/a", "2.0", OCI_MANIFEST, &index).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    // By digest: a digest that is not the body's.
    let wrong = digest_of(b"something else");
    let r = put_manifest(&pier, None, "team/a", &wrong, OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c
        .get(format!("{}/v2/team/a/manifests/{wrong}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Tags with odd characters: refused, never stored.
    let long = "a".repeat(129);
    for tag in [
        "-dash", ".dot", "a%2Fb", "a%3Ab", "a%20b", "%2E%2E", "a..%2F..", "%C3%A9", &long,
    ] {
        let r = put_manifest(&pier, None, "team/a", tag, OCI_MANIFEST, &manifest).await;
        assert!(
            r.status().is_client_error(),
            "{tag}: {} {:?}",
            r.status(),
            r.text().await
        );
    }
    let r = c
        .get(format!("{}/v2/team/a/tags/list", pier.url))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["1.0"]));
    // The longest valid tag is fine.
    let longest = format!("A{}", "_.-9".repeat(31) + "abc");
    assert_eq!(longest.len(), 128);
    let r = put_manifest(&pier, None, "team/a", &longest, OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn garbage_collection_keeps_what_a_new_manifest_of_another_repository_names() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let grace = Duration::from_millis(300);
    let hosted = pier_cache::HostedConfig {
        gc_grace: grace,
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], None).await;
    let c = client();
    // Pushed to team/a long ago, with no manifest there.
    let config = push_blob(&pier, None, "team/a", b"{\"gc\":1}").await;
    let layer = push_blob(&pier, None, "team/a", &[3u8; 3000]).await;
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    // team/b mounts them and pushes a manifest naming them; time passes.
    for d in [&config, &layer] {
        let r = c
            .post(format!(
                "{}/v2/team/b/blobs/uploads/?mount={d}&from=team/a",
                pier.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let manifest = image_manifest(&config, &[&layer]);
    let r = put_manifest(&pier, None, "team/b", "1.0", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    let r = c
        .post(format!("{}/admin/gc", pier.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: serde_json::Value = r.json().await.unwrap();
    assert_eq!(report["removed"], 0, "{report}");
    for d in [&config, &layer] {
        assert!(blob_file(&pier, d).exists(), "{d}");
        let r = c
            .get(format!("{}/v2/team/b/blobs/{d}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // Deleting tags while collections run: every tag left pulls whole.
    let mut tags = Vec::new();
    for i in 0..20 {
        let m = image_manifest(&config, &[&layer]).replace(
            r#""schemaVersion":2"#,
            &format!(r#""schemaVersion":2,"annotations":{{"n":"{i}"}}"#),
        );
        let r = put_manifest(&pier, None, "team/b", &format!("t{i}"), OCI_MANIFEST, &m).await;
        assert_eq!(r.status(), 201);
        tags.push((format!("t{i}"), digest_of(m.as_bytes())));
    }
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    let gcs = {
        let admin = pier.admin.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                let r = client()
                    .post(format!("{admin}/admin/gc"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    };
    for (i, (tag, digest)) in tags.iter().enumerate() {
        let reference = if i % 2 == 0 { tag } else { digest };
        let r = c
            .delete(format!("{}/v2/team/b/manifests/{reference}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{reference}");
    }
    gcs.await.unwrap();
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    let r = c
        .post(format!("{}/admin/gc", pier.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{}/v2/team/b/tags/list", pier.url))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["1.0"]), "{v}");
    let r = c
        .get(format!("{}/v2/team/b/manifests/1.0", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for d in [&config, &layer] {
        let r = c
            .get(format!("{}/v2/team/b/blobs/{d}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{d}");
    }
    // Deleted by digest: collected. A deleted tag leaves its manifest in the repository.
    for (i, (_, digest)) in tags.iter().enumerate() {
        let r = c
            .get(format!("{}/v2/team/b/manifests/{digest}", pier.url))
            .send()
            .await
            .unwrap();
        if i % 2 == 0 {
            assert_eq!(r.status(), 200, "{digest}");
            assert!(blob_file(&pier, digest).exists(), "{digest} kept");
        } else {
            assert_eq!(r.status(), 404, "{digest}");
            assert!(!blob_file(&pier, digest).exists(), "{digest} collected");
        }
    }
}

#[tokio::test]
async fn bad_content_ranges_and_oversized_chunks_are_refused_and_cut_back() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = pier_cache::HostedConfig {
        max_size: 10_000,
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], None).await;
    let c = client();
    let location = start_session(&pier, None, "team/a").await;
    let at = format!("{}{location}", pier.url);
    let r = c
        .patch(&at)
        .header("content-range", "0-999")
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Overlapping what was sent, or past it: 416 with where the upload is.
    for range in ["500-1499", "0-999", "999-1000", "1001-1100"] {
        let r = c
            .patch(&at)
            .header("content-range", range)
            .body(vec![2u8; 1000])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(header(&r, "range"), "0-999");
    }
    // Not a range: negative, reversed, not numbers, beyond u64.
    for range in [
        "-5-10",
        "1000--1",
        "1100-1000",
        "a-b",
        "1000-",
        "1000-99999999999999999999999",
    ] {
        let r = c
            .patch(&at)
            .header("content-range", range)
            .body(vec![2u8; 10])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{range}");
        assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    }
    // Its length not the body's: 416 with where the upload is, nothing kept.
    let r = c
        .patch(&at)
        .header("content-range", "1000-1009")
        .body(vec![2u8; 5])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "range"), "0-999");
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    // More than the budget left: 403 DENIED, cut back.
    let r = c.patch(&at).body(vec![3u8; 20_000]).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("hosted.max_size"), "{body}");
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-999");
    // A second session cannot take what the first holds.
    let other = format!("{}{}", pier.url, start_session(&pier, None, "team/b").await);
    let r = c.patch(&other).body(vec![4u8; 9_500]).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = c.patch(&other).body(vec![4u8; 9_000]).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // Cancelling gives the room back.
    let r = c.delete(&other).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .patch(&at)
        .header("content-range", "1000-9999")
        .body(vec![5u8; 9_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-9999");
}

/// A PATCH sent by hand: `head` (request line and headers, without the blank line), then each
/// of `chunks` in chunked encoding, and never the body's end: a server that waits for the whole
/// body never answers. Returns the answer's head (status line and headers) and body, or `None`
/// when none came within 10 s.
async fn patch_by_hand(pier: &Pier, head: &str, chunks: Vec<Vec<u8>>) -> Option<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = pier.url.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!("{head}\r\nHost: {addr}\r\n\r\n");
    // Written beside the read: the server may answer (and close) before taking it all.
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        for chunk in chunks {
            write
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            write.write_all(&chunk).await?;
            write.write_all(b"\r\n").await?;
        }
        // Held open, the body unfinished, until the test is done with it.
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::io::Error>(write)
    });
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = Vec::new();
        let mut byte = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return (head.to_string(), body.to_string());
                }
            }
            let n = read.read(&mut byte).await.unwrap();
            assert!(n > 0, "connection closed without an answer: {text:?}");
            buf.extend_from_slice(&byte[..n]);
        }
    })
    .await
    .ok();
    writer.abort();
    answer
}

/// A PATCH whose Content-Length differs from its Content-Range's length is refused from its
/// headers: 416 with where the upload is, before a byte of the body is read.
#[tokio::test]
async fn a_content_length_not_the_ranges_is_refused_before_the_body() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let c = client();
    let location = start_session(&pier, None, "team/a").await;
    let at = format!("{}{location}", pier.url);
    let r = c
        .patch(&at)
        .header("content-range", "0-9")
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Ten bytes announced by the range, twenty by Content-Length, and no body sent at all.
    let head = format!("PATCH {location} HTTP/1.1\r\nContent-Range: 10-19\r\nContent-Length: 20");
    let answer = patch_by_hand(&pier, &head, Vec::new()).await;
    let Some((status, body)) = answer else {
        panic!("no answer without the body: the body is read before the range is checked");
    };
    assert!(status.starts_with("HTTP/1.1 416"), "{status}");
    assert!(
        status.to_ascii_lowercase().contains("range: 0-9"),
        "{status}"
    );
    assert!(body.contains("RANGE_INVALID"), "{body}");
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(header(&r, "range"), "0-9");
    let data = upload_data(&pier, &location);
    assert_eq!(std::fs::metadata(data).unwrap().len(), 10);
}

/// A streamed PATCH (no Content-Length) that sends more than its Content-Range announced is
/// stopped at the first byte too many, without waiting for the rest: 416, the session where it
/// was, nothing of the chunk kept; a batch already written (past 1 MiB) is cut back off.
#[tokio::test]
async fn a_streamed_chunk_longer_than_its_range_is_stopped_and_cut_back() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let c = client();
    let location = start_session(&pier, None, "team/a").await;
    let at = format!("{}{location}", pier.url);
    let r = c
        .patch(&at)
        .header("content-range", "0-9")
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let data = upload_data(&pier, &location);
    let chunked = |range: &str| {
        format!("PATCH {location} HTTP/1.1\r\nContent-Range: {range}\r\nTransfer-Encoding: chunked")
    };
    // Five bytes more than the ten announced, and the body never ends.
    let answer = patch_by_hand(&pier, &chunked("10-19"), vec![vec![2u8; 15]]).await;
    let Some((status, body)) = answer else {
        panic!("no answer: the body was read to its end before its length was checked");
    };
    assert!(status.starts_with("HTTP/1.1 416"), "{status}");
    assert!(
        status.to_ascii_lowercase().contains("range: 0-9"),
        "{status}"
    );
    assert!(body.contains("RANGE_INVALID"), "{body}");
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 10);
    // 1.5 MiB announced, 2 MiB sent in 256 KiB pieces: the first MiB is written before the
    // excess arrives, and cut back off.
    let piece = vec![3u8; 256 << 10];
    let range = format!("10-{}", 10 + (3 << 19) - 1);
    let answer = patch_by_hand(&pier, &chunked(&range), vec![piece; 8]).await;
    let Some((status, body)) = answer else {
        panic!("no answer to a 2 MiB chunk announced as 1.5 MiB");
    };
    assert!(status.starts_with("HTTP/1.1 416"), "{status}");
    assert!(body.contains("RANGE_INVALID"), "{body}");
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 10);
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-9");
    assert_eq!(pier.mirror.cache.hosted_usage().uploading_bytes, 10);
    // The upload goes on from where it was, and finishes whole.
    let rest = vec![4u8; 5];
    let mut whole = vec![1u8; 10];
    whole.extend_from_slice(&rest);
    let r = c
        .put(format!("{at}?digest={}", digest_of(&whole)))
        .body(rest)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
}

/// `Content-Range: 0-18446744073709551615` (no length fits) is refused before anything is
/// written.
#[tokio::test]
async fn a_content_range_up_to_u64_max_is_refused() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let c = client();
    let location = start_session(&pier, None, "team/a").await;
    let at = format!("{}{location}", pier.url);
    for body in [vec![1u8; 10], Vec::new()] {
        let r = c
            .patch(&at)
            .header("content-range", "0-18446744073709551615")
            .body(body.clone())
            .send()
            .await;
        let Ok(r) = r else {
            let r = c.get(&at).send().await.unwrap();
            panic!(
                "{} bytes: connection dropped; the session is now at {:?}",
                body.len(),
                r.headers().get("range")
            );
        };
        assert_eq!(r.status(), 400, "{} bytes", body.len());
        assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    }
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(r.status(), 204);
}

/// How many sessions one client may hold open: an anonymous client opening sessions without
/// end gets 429 TOOMANYREQUESTS naming `hosted.max_uploads_per_client` past the default (100),
/// with nothing created on disk; and users together stop at `hosted.max_uploads`.
#[tokio::test]
async fn upload_sessions_are_limited() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let c = client();
    let mut refused = 0;
    for i in 0..150 {
        let r = c
            .post(format!("{}/v2/team/a/blobs/uploads/", pier.url))
            .send()
            .await
            .unwrap();
        if i < 100 {
            assert_eq!(r.status(), 202, "session {i}");
            continue;
        }
        assert_eq!(r.status(), 429, "session {i}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS", "{v}");
        let message = v["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("hosted.max_uploads_per_client"),
            "{message}"
        );
        refused += 1;
    }
    assert_eq!(refused, 50);
    // A monolithic upload needs a session too.
    let r = client()
        .post(format!(
            "{}/v2/team/a/blobs/uploads/?digest={}",
            pier.url,
            digest_of(b"x")
        ))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let open = upload_dirs(&pier);
    assert_eq!(open, 100);
    let r = client()
        .get(format!("{}/metrics", pier.url))
        .send()
        .await
        .unwrap();
    let metrics = r.text().await.unwrap();
    assert!(
        metrics.contains("pier_hosted_uploads_in_progress 100"),
        "{metrics}"
    );

    // Users are counted apart, and all of them together stop at the node's limit.
    let dir = tempfile::tempdir().unwrap();
    let limits = pier_cache::HostedConfig {
        max_uploads: 4,
        max_uploads_per_client: 3,
        ..Default::default()
    };
    let pier = start(&up, Some(users(dir.path())), limits, vec![], None).await;
    for _ in 0..3 {
        start_session(&pier, Some("alice"), "team/a").await;
    }
    let post = |user: &str, repo: &str| {
        client()
            .post(format!("{}/v2/{repo}/blobs/uploads/", pier.url))
            .basic_auth(user, Some("pw"))
            .send()
    };
    let r = post("alice", "team/a").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("hosted.max_uploads_per_client"));
    start_session(&pier, Some("carol"), "local/x").await;
    let r = post("carol", "local/x").await.unwrap();
    assert_eq!(r.status(), 429);
    let body = r.text().await.unwrap();
    assert!(body.contains("hosted.max_uploads is 4"), "{body}");
}

/// A user who may only pull a hosted repository reads the status of another user's upload
/// session there (given its id): upload status is part of a push.
#[tokio::test]
async fn a_user_who_may_only_pull_cannot_read_an_upload_session() {
    let (_dir, _up, pier) = start_with_users().await;
    let location = start_session(&pier, Some("alice"), "team/a").await;
    let at = format!("{}{location}", pier.url);
    let r = client()
        .patch(&at)
        .basic_auth("alice", Some("pw"))
        .body(b"alice's ".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for user in [Some("bob"), Some("erin"), None] {
        let r = as_user(client().get(&at), user).send().await.unwrap();
        let got = r.status();
        let range = r.headers().get("range").cloned();
        assert!(got == 401 || got == 403, "{user:?}: {got} range {range:?}");
    }
}

/// An index whose child manifest this repository holds only as a blob (the same bytes pushed
/// as a blob, and pushed as a manifest to another repository) is refused, as the Distribution
/// registry does: MANIFEST_BLOB_UNKNOWN naming the child. The child is no manifest of that
/// repository either, before or after a restart; once pushed there as a manifest, the index is
/// taken.
#[tokio::test]
async fn an_index_child_held_only_as_a_blob() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let config = push_blob(&pier, None, "team/a", b"{\"a\":1}").await;
    let layer = push_blob(&pier, None, "team/a", b"a's layer").await;
    let manifest = image_manifest(&config, &[&layer]);
    let r = put_manifest(&pier, None, "team/a", "1.0", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    let md = digest_of(manifest.as_bytes());
    push_blob(&pier, None, "team/b", manifest.as_bytes()).await;
    let index = index_of(&md, manifest.len());
    let refused = |r: reqwest::Response, md: String| async move {
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN", "{v}");
        let message = v["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(&md), "{message}");
    };
    let r = put_manifest(&pier, None, "team/b", "multi", OCI_INDEX, &index).await;
    refused(r, md.clone()).await;
    let child = format!("{}/v2/team/b/manifests/{md}", pier.url);
    let r = client().get(&child).send().await.unwrap();
    assert_eq!(r.status(), 404, "a blob of team/b is no manifest of it");
    // Nothing was tagged.
    let r = client()
        .get(format!("{}/v2/team/b/manifests/multi", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The same after a restart: what a repository holds as manifests is on disk.
    let dir = pier.stop().await;
    let pier = start(&up, None, Default::default(), vec![], Some(dir)).await;
    let r = put_manifest(&pier, None, "team/b", "multi", OCI_INDEX, &index).await;
    refused(r, md.clone()).await;
    // Pushed to team/b as a manifest (by digest, as `skopeo copy --all` pushes children, its
    // blobs first), the child may be named.
    push_blob(&pier, None, "team/b", b"{\"a\":1}").await;
    push_blob(&pier, None, "team/b", b"a's layer").await;
    let r = put_manifest(&pier, None, "team/b", &md, OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    let r = put_manifest(&pier, None, "team/b", "multi", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let child = format!("{}/v2/team/b/manifests/{md}", pier.url);
    let r = client().get(&child).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
