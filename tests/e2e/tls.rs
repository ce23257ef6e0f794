//! TLS to NATS: `amends serve` and `amends submit` against a nats-server
//! that speaks TLS only, with a certificate from a private CA, and one that
//! also verifies clients (mutual TLS).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use amends_nats::test_support::{Options, Tls};

use crate::support::{Serve, Server, assert_exits_saying};

const PARTITIONS: u32 = 2;

/// Serve's flags beyond `more`: a short lease, so that each serve after
/// the first (all on one deployment) takes over soon after the last one
/// was killed.
fn flags<'a>(more: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec!["--lease-ttl-ms", "1000"];
    flags.extend_from_slice(more);
    flags
}

fn tls_server(mode: Tls) -> Server {
    Server::start_with(Options {
        tls: Some(mode),
        ..Default::default()
    })
}

/// Waits until `serve` says it serves, failing with its log after 15 s.
async fn assert_serves(serve: &mut Serve) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !serve.log().contains(" serving") {
        serve.assert_running();
        assert!(Instant::now() < deadline, "{}", serve.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serve.assert_running();
}

/// `amends submit` of an `open_account` with `flags`.
fn open_account(server: &Server, account: &str, flags: &[&str]) -> Output {
    let body = format!(r#"{{"command":{{"type":"open_account","account":"{account}"}}}}"#);
    let flags = [&["--timeout-ms", "3000"], flags].concat();
    crate::submit_with(server, &flags, &body)
}

/// Starts serve with the config file `conf` (and a store beside it) and
/// checks that it serves and that `submit` with `flags` is confirmed.
async fn assert_serves_from_file(server: &Server, conf: &Path, flags: &[&str]) {
    let mut serve = Serve::start_with(
        server,
        &conf.with_extension("data"),
        PARTITIONS,
        &self::flags(&["--config", path(conf)]),
    );
    assert_serves(&mut serve).await;
    let out = open_account(server, "carol", flags);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", serve.log());
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_submit_speak_tls_to_a_server_with_a_private_ca() {
    // Proves the TLS options work and a TLS failure is not retried forever: against a TLS-only nats-server whose certificate comes from a private CA, `serve` without the CA (or with a CA file that does not exist) exits non-zero within seconds saying so; with `--nats-tls-ca`, and again with `[nats.tls] ca_file` in a config file (a path relative to the file), it serves, and `amends submit --nats-tls-ca` gets a confirmation, while `submit` without the CA fails.
    let server = tls_server(Tls::Server);
    let files = server.tls_files().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();

    let mut serve = Serve::start_with(&server, &dir.path().join("no-ca"), PARTITIONS, &flags(&[]));
    assert_exits_saying(&mut serve, Duration::from_secs(15), "TLS handshake");
    let mut serve = Serve::start_with(
        &server,
        &dir.path().join("missing-ca"),
        PARTITIONS,
        &flags(&["--nats-tls-ca", "/nonexistent/ca.pem"]),
    );
    assert_exits_saying(
        &mut serve,
        Duration::from_secs(15),
        "--nats-tls-ca /nonexistent/ca.pem: no such file",
    );

    let mut serve = Serve::start_with(
        &server,
        &dir.path().join("flag"),
        PARTITIONS,
        &flags(&["--nats-tls-ca", path(&files.ca)]),
    );
    assert_serves(&mut serve).await;
    let out = open_account(&server, "alice", &["--nats-tls-ca", path(&files.ca)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", serve.log());
    let out = open_account(&server, "bob", &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    drop(serve);

    // The same from a config file, the CA beside it.
    let conf_dir = dir.path().join("conf");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::copy(&files.ca, conf_dir.join("nats-ca.pem")).unwrap();
    let conf = conf_dir.join("amends.toml");
    std::fs::write(&conf, "[nats.tls]\nca_file = \"nats-ca.pem\"\n").unwrap();
    assert_serves_from_file(&server, &conf, &["--nats-tls-ca", path(&files.ca)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_submit_speak_mutual_tls_with_a_client_certificate() {
    // Proves mutual TLS: against a nats-server that verifies clients, `serve` with the CA but no client certificate exits non-zero within seconds saying the handshake failed; with `--nats-tls-cert` and `--nats-tls-key` (and again from `[nats.tls]` in a config file) it serves, and `amends submit` with the certificate gets a confirmation, without it fails.
    let server = tls_server(Tls::Mutual);
    let files = server.tls_files().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let ca = ["--nats-tls-ca", path(&files.ca)];
    let cert = [
        "--nats-tls-ca",
        path(&files.ca),
        "--nats-tls-cert",
        path(&files.client_cert),
        "--nats-tls-key",
        path(&files.client_key),
    ];

    let mut serve = Serve::start_with(
        &server,
        &dir.path().join("no-cert"),
        PARTITIONS,
        &flags(&ca),
    );
    assert_exits_saying(&mut serve, Duration::from_secs(15), "TLS handshake");

    let mut serve = Serve::start_with(&server, &dir.path().join("flag"), PARTITIONS, &flags(&cert));
    assert_serves(&mut serve).await;
    let out = open_account(&server, "alice", &cert);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", serve.log());
    let out = open_account(&server, "bob", &ca);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    drop(serve);

    let conf = dir.path().join("amends.toml");
    std::fs::write(
        &conf,
        format!(
            "[nats.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            path(&files.ca),
            path(&files.client_cert),
            path(&files.client_key),
        ),
    )
    .unwrap();
    assert_serves_from_file(&server, &conf, &cert).await;
}
