//! End-to-end tests: real upstream registry (Debian's docker-registry, the CNCF Distribution
//! registry), the real pier binary, real clients.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the assertion"
)]

#[path = "../support/mod.rs"]
mod support;

mod deploy;
mod docker;
mod docker_push;
mod image;
mod metrics;
mod region;
mod runtimes;
mod signing;
mod skopeo_pull;
mod skopeo_push;
mod tls;
mod warm;
