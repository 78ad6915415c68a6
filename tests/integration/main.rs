//! Integration tests: pier in-process against a fake upstream that misbehaves on demand.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the assertion"
)]

mod fake_upstream;
mod harness;

mod api;
mod auth;
mod client_auth;
mod disk;
mod fills;
mod freshness;
mod hardening;
mod hosted;
mod hosted_hostile;
mod hostile;
mod metrics;
mod negotiation;
mod pushing;
mod referrers;
mod region;
mod repository_access;
mod review_hosted;
mod review_perf;
mod review_sendfile;
mod routing;
mod secrets;
