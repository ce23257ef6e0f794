//! `amends serve --http ADDR` (and `amends dev`): the device page and the
//! operator console, served by the service itself, with no database of
//! their own.
//!
//! The device page (`/`) is a small web app in plain ES modules
//! (`web/`, compiled into the binary). The browser makes each operation's
//! UUID v7 op id itself, keeps it in `localStorage` with the request body
//! before anything is sent, and sends it through this module's HTTP
//! endpoint; every change in the operation's life comes back pushed over
//! one Server-Sent Events stream. The console (`/console`) is one page per
//! deployment, pushed once a second, derived from the streams and the
//! service's endpoints like any other consumer. Neither reads the store.
//!
//! Why an HTTP endpoint and not NATS WebSocket from the browser: a device
//! that may publish on `<prefix>.req.*` may also publish forged saga step
//! messages (`specs/protocol.md`, "Sagas", "Trust"), which no NATS
//! permission can tell from amends's own; here the service checks every
//! body and refuses what only amends may write, routes with the core's
//! partitioner, and no NATS credential ever reaches a browser. See
//! `docs/web.md` for the whole argument and the permissions.
//!
//! # Layout
//!
//! - `mod.rs`: the listener, the routes and the static files.
//! - `hub.rs`: follows the four streams (ordered consumers, from a short
//!   look-back) and fans each decision, apology and saga step out to the
//!   pages that watch its op id; keeps the console's counters.
//! - `api.rs`: `POST /api/ops` (publish a device's request with its op id),
//!   `GET /api/events` (the device's pushed stream, recovering each op by
//!   the status endpoint first), `GET /api/trace/<op id>` (an op's life).
//! - `console.rs`: `GET /api/console/events`, the console's snapshot
//!   (partition stats and owners, rates, refusals, holds, sagas).
//!
//! It deliberately does not authenticate anyone: put the console (and the
//! device page, for real users) behind the proxy that does (`docs/web.md`).

mod api;
mod console;
mod hub;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amends_nats::topology::Prefix;
use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode};

use hub::Hub;

/// A response body: a whole one, or a pushed stream.
type Body = BoxBody<Bytes, Infallible>;

/// The pages and their scripts, compiled in so that the binary serves them
/// wherever it runs (path, content type, bytes).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../web/device.html"),
    ),
    (
        "/console",
        "text/html; charset=utf-8",
        include_str!("../../web/console.html"),
    ),
    (
        "/web/device.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/device.js"),
    ),
    (
        "/web/console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/console.js"),
    ),
    (
        "/web/opid.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/opid.js"),
    ),
    (
        "/web/style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
];

/// What every request handler shares.
struct Web {
    /// Publishes the devices' requests and asks the status and stats
    /// endpoints.
    client: amends_client::Client,
    /// Reads the streams (the hub) and single messages (a trace).
    js: async_nats::jetstream::Context,
    prefix: Prefix,
    hub: Arc<Hub>,
}

/// Serves the pages on `addr`; returns the address bound (the port chosen
/// when `addr` names port 0). Runs until the process ends.
pub async fn start(
    addr: SocketAddr,
    client: amends_client::Client,
    js: async_nats::jetstream::Context,
    prefix: Prefix,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving the pages on {addr} (--http)"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let hub = Hub::start(js.clone(), prefix.clone(), client.partitions());
    let web = Arc::new(Web {
        client,
        js,
        prefix,
        hub,
    });
    tokio::spawn(accept(listener, web));
    Ok(bound)
}

/// Serves each connection of `listener` (HTTP/1) on its own task.
async fn accept(listener: tokio::net::TcpListener, web: Arc<Web>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "http listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let web = Arc::clone(&web);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let web = Arc::clone(&web);
                    async move { Ok::<_, Infallible>(route(&web, request).await) }
                });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

/// The answer to one request.
async fn route(web: &Arc<Web>, request: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    match (request.method().clone(), path.as_str()) {
        (Method::POST, "/api/ops") => api::submit(web, request).await,
        (Method::GET, "/api/events") => api::events(web, request.uri().query().unwrap_or("")),
        (Method::GET, "/api/console/events") => console::events(web),
        (Method::GET, p) if p.starts_with("/api/trace/") => {
            api::trace(web, p.trim_start_matches("/api/trace/")).await
        }
        (Method::GET | Method::HEAD, "/favicon.ico") => {
            whole(StatusCode::NO_CONTENT, "image/x-icon", b"")
        }
        (Method::GET | Method::HEAD, p) => match ASSETS.iter().find(|(at, _, _)| *at == p) {
            Some((_, content_type, text)) => whole(StatusCode::OK, content_type, text.as_bytes()),
            None => whole(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: the device page is /, the console /console\n",
            ),
        },
        _ => whole(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"GET, or POST /api/ops\n",
        ),
    }
}

/// A whole response.
fn whole(status: StatusCode, content_type: &str, body: &[u8]) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body)).boxed());
    *response.status_mut() = status;
    set_header(&mut response, hyper::header::CONTENT_TYPE, content_type);
    // The pages change with the binary; a reload must get this one's.
    set_header(&mut response, hyper::header::CACHE_CONTROL, "no-store");
    response
}

/// A JSON response.
fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    whole(status, "application/json", value.to_string().as_bytes())
}

fn set_header<B>(response: &mut Response<B>, name: hyper::header::HeaderName, value: &str) {
    if let Ok(value) = hyper::header::HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

/// A Server-Sent Events response fed by `events`: each item is one event's
/// `data:` (a JSON object, one line). A comment goes out every
/// [`SSE_KEEPALIVE`] so that proxies keep an idle stream open.
fn sse(events: tokio::sync::mpsc::Receiver<String>) -> Response<Body> {
    let frames = futures_util::stream::unfold(events, |mut events| async move {
        let text = match tokio::time::timeout(SSE_KEEPALIVE, events.recv()).await {
            Ok(Some(data)) => format!("data: {data}\n\n"),
            Ok(None) => return None,
            Err(_) => ": keep-alive\n\n".to_owned(),
        };
        let frame = hyper::body::Frame::data(Bytes::from(text));
        Some((Ok::<_, Infallible>(frame), events))
    });
    let mut response = Response::new(http_body_util::StreamBody::new(frames).boxed());
    set_header(
        &mut response,
        hyper::header::CONTENT_TYPE,
        "text/event-stream",
    );
    set_header(&mut response, hyper::header::CACHE_CONTROL, "no-store");
    response
}

/// How often an idle event stream sends a comment.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);
