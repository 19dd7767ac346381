//! End-to-end suite: a real Envoy 1.40 (`--concurrency 2`) with the built `filter.wasm` and the
//! rendered bootstrap, in front of in-process mock providers, all on 127.0.0.1.
//! Run with `make test-e2e` (builds filter.wasm, the fault build and the virtualenv first).

mod auth;
mod availability;
mod balance;
mod bodies;
mod client;
mod compression;
mod dashboard;
mod fail2ban;
mod fault;
mod gateway;
mod global;
mod hostile;
mod istio;
mod limits;
mod listener;
mod models;
mod observability;
mod retry;
mod secrets;
mod streaming;
mod tokens;
