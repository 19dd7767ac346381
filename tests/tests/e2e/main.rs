//! End-to-end suite: a real Envoy 1.40 (`--concurrency 2`) with the built `filter.wasm` and the
//! rendered bootstrap, in front of in-process mock providers, all on 127.0.0.1.
//! Run with `make test-e2e` (builds filter.wasm, the fault build and the virtualenv first).

mod auth;
mod balance;
mod limits;
mod fail2ban;
mod models;
mod streaming;
mod bodies;
mod observability;
mod client;
mod secrets;
mod hostile;
mod fault;
mod listener;
mod retry;
mod tokens;
mod dashboard;
