//! The plain-HTTP stats and control port:
//!
//! - `GET /stats` → `{"calls":N,"hits":M,"descriptor_hits":D,"ok":O,"over_limit":X,"errors":E,"delay_ms":T}`
//! - `POST /control` with `{"delay_ms":N}` → every later call stalls N ms before it is handled
//!   (0 turns it off); answers the new stats.

use crate::service::Counters;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    delay_ms: Option<u64>,
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn stats_json(c: &Counters) -> String {
    serde_json::to_string(&c.snapshot()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

async fn handle(req: Request<Incoming>, c: Arc<Counters>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/stats") => Ok(reply(StatusCode::OK, stats_json(&c))),
        (&Method::POST, "/control") => {
            let body = req.into_body().collect().await?.to_bytes();
            match serde_json::from_slice::<Control>(&body) {
                Ok(ctl) => {
                    if let Some(d) = ctl.delay_ms {
                        c.delay_ms.store(d, Ordering::SeqCst);
                    }
                    Ok(reply(StatusCode::OK, stats_json(&c)))
                }
                Err(e) => Ok(reply(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e.to_string() }).to_string())),
            }
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, r#"{"error":"GET /stats or POST /control"}"#.into())),
    }
}

/// Serves the stats port until the process ends.
pub async fn serve(listener: TcpListener, counters: Arc<Counters>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let c = counters.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, c.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
