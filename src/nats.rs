//! The NATS connection flags shared by the commands that connect, and the
//! deployment flags (prefix, partition count) of the client-side commands
//! (`submit`, the queries, `audit`, `tail`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

/// The NATS server used when no URL is given.
pub const NATS_URL_DEFAULT: &str = "nats://127.0.0.1:4222";

/// How to reach NATS. Every flag has an environment fallback.
#[derive(Args, Debug, Clone, Default)]
pub struct NatsArgs {
    /// NATS server URLs (nats://, tls://, ws://, wss://); repeat the flag
    /// or give a comma-separated list [default: nats://127.0.0.1:4222, or
    /// the URL `amends dev` left in ./.amends-dev].
    // No clap default: `serve` tells a URL given from none, to take one
    // from its config file.
    #[arg(long = "nats-url", env = "AMENDS_NATS_URL", value_delimiter = ',')]
    pub urls: Vec<String>,
    /// The NATS user (with --nats-password).
    #[arg(long, env = "AMENDS_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// The NATS password (with --nats-user).
    #[arg(
        long,
        env = "AMENDS_NATS_PASSWORD",
        requires = "nats_user",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,
    /// A NATS authentication token.
    #[arg(
        long,
        env = "AMENDS_NATS_TOKEN",
        conflicts_with_all = ["nats_user", "nats_creds"],
        hide_env_values = true
    )]
    pub nats_token: Option<String>,
    /// A NATS `.creds` file (user JWT and nkey seed).
    #[arg(long, env = "AMENDS_NATS_CREDS", conflicts_with = "nats_user")]
    pub nats_creds: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS to NATS. A `tls://` URL, or a server that requires TLS, turns TLS
/// on by itself; these flags say whom to trust and who we are.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct TlsArgs {
    /// A PEM file of CA certificates to trust (for a server certificate
    /// from a private CA), in addition to the system's.
    #[arg(long = "nats-tls-ca", env = "AMENDS_NATS_TLS_CA")]
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate (chain), for a server that verifies
    /// clients (mutual TLS); with --nats-tls-key.
    #[arg(
        long = "nats-tls-cert",
        env = "AMENDS_NATS_TLS_CERT",
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,
    /// The PEM private key of --nats-tls-cert.
    #[arg(
        long = "nats-tls-key",
        env = "AMENDS_NATS_TLS_KEY",
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,
    /// Refuse to connect without TLS, even to a `nats://` URL.
    #[arg(long = "nats-tls-required", env = "AMENDS_NATS_TLS_REQUIRED")]
    pub required: bool,
}

impl TlsArgs {
    /// Whether any TLS setting is given.
    pub fn is_set(&self) -> bool {
        *self != TlsArgs::default()
    }

    /// These settings as the client library takes them.
    pub fn client_tls(&self) -> amends_client::Tls {
        let mut tls = amends_client::Tls::default();
        tls.required = self.required;
        tls.ca_file.clone_from(&self.ca_file);
        if let (Some(cert_file), Some(key_file)) = (&self.cert_file, &self.key_file) {
            tls.client_cert = Some(amends_client::ClientCert {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            });
        }
        tls
    }

    /// Applies these settings to raw connect options.
    fn configure(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> anyhow::Result<async_nats::ConnectOptions> {
        // async-nats reads the files only when it connects, and reports a
        // missing one as a TLS error; naming the flag here is clearer.
        for (flag, path) in [
            ("--nats-tls-ca", &self.ca_file),
            ("--nats-tls-cert", &self.cert_file),
            ("--nats-tls-key", &self.key_file),
        ] {
            if let Some(path) = path {
                anyhow::ensure!(path.is_file(), "{flag} {}: no such file", path.display());
            }
        }
        if self.required {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }
}

impl NatsArgs {
    /// The URLs, trimmed, empty entries dropped; [`NATS_URL_DEFAULT`] if
    /// none was given at all, an error if only empty ones were.
    pub fn servers(&self) -> anyhow::Result<Vec<String>> {
        if self.urls.is_empty() {
            return Ok(vec![NATS_URL_DEFAULT.to_owned()]);
        }
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        anyhow::ensure!(
            !urls.is_empty(),
            "no NATS URL given (--nats-url or AMENDS_NATS_URL)"
        );
        for url in &urls {
            check_url(url)?;
        }
        Ok(urls)
    }

    /// The client's authentication.
    pub fn client_auth(&self) -> amends_client::Auth {
        match (
            &self.nats_user,
            &self.nats_password,
            &self.nats_token,
            &self.nats_creds,
        ) {
            (Some(user), Some(password), _, _) => amends_client::Auth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (_, _, Some(token), _) => amends_client::Auth::Token(token.clone()),
            (_, _, _, Some(creds)) => amends_client::Auth::CredsFile(creds.clone()),
            _ => amends_client::Auth::None,
        }
    }

    /// Connects a raw NATS client (for the service), retrying the first
    /// connection with backoff until it succeeds; the client then
    /// reconnects on its own for as long as it lives.
    pub async fn connect(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        // Parsed one by one: async-nats 0.51 takes a `&str` as one URL, so
        // a comma-separated list given as one string fails with "invalid
        // port number".
        let urls = self.servers()?;
        let addrs = urls
            .iter()
            .map(|url| {
                url.parse::<async_nats::ServerAddr>()
                    .with_context(|| format!("invalid NATS URL {url:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let servers = urls.join(",");
        let mut attempt: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            let mut options = async_nats::ConnectOptions::new()
                .name(name)
                .connection_timeout(Duration::from_secs(5))
                .reconnect_delay_callback(|attempts| {
                    let attempts = u64::try_from(attempts).unwrap_or(u64::MAX);
                    Duration::from_millis(attempts.saturating_mul(100).min(2_000))
                });
            if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
                options = options.user_and_password(user.clone(), password.clone());
            }
            if let Some(token) = &self.nats_token {
                options = options.token(token.clone());
            }
            if let Some(creds) = &self.nats_creds {
                options = options
                    .credentials_file(creds)
                    .await
                    .with_context(|| format!("reading the NATS creds file {}", creds.display()))?;
            }
            options = self.tls.configure(options)?;
            match options.connect(addrs.clone()).await {
                Ok(client) => return Ok(client),
                Err(e) if e.kind() == async_nats::ConnectErrorKind::ServerParse => {
                    return Err(e).with_context(|| format!("invalid NATS URL in {servers:?}"));
                }
                // Trying again cannot help: the server refused who we are,
                // or the TLS handshake failed. Exit with the error, so that
                // the operator (or a process supervisor's log) sees it.
                Err(e)
                    if matches!(
                        e.kind(),
                        async_nats::ConnectErrorKind::AuthorizationViolation
                            | async_nats::ConnectErrorKind::Authentication
                    ) =>
                {
                    return Err(e).with_context(|| {
                        format!(
                            "NATS at {servers:?} refused the credentials (check --nats-user/--nats-password, --nats-token or --nats-creds)"
                        )
                    });
                }
                Err(e)
                    if e.kind() == async_nats::ConnectErrorKind::Tls
                        || tls_refusal(&e).is_some() =>
                {
                    return Err(e).with_context(|| {
                        format!(
                            "the TLS handshake with NATS at {servers:?} failed (check --nats-tls-ca for a server certificate from a private CA, and --nats-tls-cert/--nats-tls-key for a server that verifies clients)"
                        )
                    });
                }
                Err(e) => {
                    let delay = Duration::from_millis(
                        100u64.saturating_mul(1u64 << attempt.min(5)).min(2_000),
                    );
                    tracing::warn!(servers = %servers, attempt, error = %e, "cannot connect to NATS yet; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// The flags that name a deployment from the client side: how to connect,
/// its subject prefix and, optionally, its partition count (read from the
/// deployment when absent).
#[derive(Args, Debug, Clone)]
pub struct DeploymentArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The partition count; read from the deployment when absent.
    #[arg(long, short = 'n', env = "AMENDS_PARTITIONS")]
    pub partitions: Option<u32>,
    /// The subject prefix of the deployment.
    #[arg(long, env = "AMENDS_PREFIX", default_value = "amends")]
    pub prefix: String,
}

impl DeploymentArgs {
    /// The NATS flags, with the URL `amends dev` left here (see
    /// [`DEV_URL_FILE`]) when none is given.
    pub fn nats(&self) -> NatsArgs {
        let mut nats = self.nats.clone();
        if nats.urls.is_empty()
            && let Some(url) = dev_url()
        {
            nats.urls = vec![url];
        }
        nats
    }

    /// Connects the client library to the deployment, with an error that
    /// names the URLs and the prefix and says what to check.
    pub async fn connect(&self, name: &str) -> anyhow::Result<amends_client::Client> {
        let options = self.client_options(name)?;
        let urls = options.servers.join(",");
        amends_client::Client::connect(options).await.map_err(|e| {
            let hint = match &e {
                amends_client::Error::Connect(_) => format!(
                    "cannot connect to NATS at {urls}: is a nats-server running there? (--nats-url or AMENDS_NATS_URL; `amends dev` prints its URL)"
                ),
                amends_client::Error::Meta { bucket, .. } => format!(
                    "no amends deployment with prefix {:?} at {urls} (its bucket {bucket} is missing): start `amends serve` against this NATS, or give the --nats-url and --prefix of a running one",
                    self.prefix
                ),
                _ => format!("connecting to the deployment at {urls} (prefix {:?})", self.prefix),
            };
            anyhow::Error::new(e).context(hint)
        })
    }

    /// The client options these flags give, with `name` as the connection
    /// name.
    pub fn client_options(&self, name: &str) -> anyhow::Result<amends_client::Options> {
        let mut options = amends_client::Options::new(String::new());
        options.servers = self.nats().servers()?;
        options.auth = self.nats.client_auth();
        options.tls = self.nats.tls.client_tls();
        options.prefix = self.topology_prefix()?;
        options.partitions = self.partition_count()?;
        options.name = Some(name.to_owned());
        Ok(options)
    }

    /// Connects a raw JetStream context within `timeout` (for the commands
    /// that read the streams themselves: `audit`, `tail`), with the
    /// partition count: `--partitions`, else the deployment's.
    pub async fn jetstream(
        &self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<(
        async_nats::jetstream::Context,
        amends_core::route::Partitions,
    )> {
        let client = tokio::time::timeout(timeout, self.nats().connect(name))
            .await
            .map_err(|_| anyhow::anyhow!("no NATS connection within {timeout:?}"))??;
        let js = async_nats::jetstream::new(client);
        let partitions = match self.partition_count()? {
            Some(n) => n,
            None => amends_client::read_partitions(&js, &self.topology_prefix()?)
                .await
                .with_context(|| {
                    format!(
                        "reading the partition count: is there an amends deployment with prefix {:?}?",
                        self.prefix
                    )
                })?,
        };
        Ok((js, partitions))
    }

    /// `--prefix`, validated: the protocol's `Prefix`, which the topology
    /// and the client build subject and stream names from alike.
    pub fn topology_prefix(&self) -> anyhow::Result<amends_core::protocol::Prefix> {
        amends_core::protocol::Prefix::new(self.prefix.clone())
            .with_context(|| format!("invalid --prefix {:?}", self.prefix))
    }

    /// `--partitions`, validated, if given.
    pub fn partition_count(&self) -> anyhow::Result<Option<amends_core::route::Partitions>> {
        self.partitions
            .map(amends_core::route::Partitions::new)
            .transpose()
            .context("invalid --partitions")
    }
}

/// Refuses a URL that is not `[scheme://]host[:port]` with a known scheme,
/// before it reaches the client (which would report `nats//host`, say, as
/// a DNS error for a host of that name).
fn check_url(url: &str) -> anyhow::Result<()> {
    let bad = |why: &str| {
        anyhow::anyhow!(
            "invalid NATS URL {url:?}: {why}; expected nats://host:port (or tls://, ws://, wss://)"
        )
    };
    let rest = match url.split_once("://") {
        Some((scheme, rest)) => {
            if !["nats", "tls", "ws", "wss"].contains(&scheme.to_ascii_lowercase().as_str()) {
                return Err(bad(&format!("unknown scheme {scheme:?}")));
            }
            rest
        }
        None => url,
    };
    // Credentials may precede the host; a path may follow for websockets.
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.split_once('/').map_or(host_port, |(h, _)| h);
    if host_port.is_empty() || rest.starts_with('/') {
        return Err(bad("no host"));
    }
    if url.split_once("://").is_none() && (url.contains('/') || url.contains(' ')) {
        return Err(bad("not a URL"));
    }
    if let Some((host, port)) = host_port.rsplit_once(':')
        && !host.ends_with(']')
        && !host.contains(':')
    {
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if port.parse::<u16>().is_err() {
            return Err(bad(&format!("port {port:?} is not a number below 65536")));
        }
    }
    Ok(())
}

/// The file where `amends dev` leaves its NATS URL, relative to its data
/// directory; the client commands read `./.amends-dev/nats-url` when no
/// URL is given.
pub const DEV_URL_FILE: &str = "nats-url";

/// The default data directory of `amends dev`.
pub const DEV_DATA_DIR: &str = ".amends-dev";

/// The URL `amends dev` (with its default data directory, here) left, if
/// it runs: the file is removed when it stops.
fn dev_url() -> Option<String> {
    let path = std::path::Path::new(DEV_DATA_DIR).join(DEV_URL_FILE);
    let url = std::fs::read_to_string(&path).ok()?.trim().to_owned();
    (!url.is_empty()).then(|| {
        tracing::info!(%url, file = %path.display(), "no --nats-url: using the URL amends dev left");
        url
    })
}

/// The TLS error under a connection failure, if the handshake failed.
///
/// async-nats 0.51 reports a failed handshake (an unknown issuer, a client
/// certificate the server requires) as `ConnectErrorKind::Io`, not `Tls`:
/// its connector turns the `io::Error` of tokio-rustls's handshake into a
/// connect error with `?`, and tokio-rustls carries the `rustls::Error`
/// inside that `io::Error`. So the error is looked for there; retrying
/// cannot fix a certificate.
fn tls_refusal(error: &async_nats::ConnectError) -> Option<&async_nats::rustls::Error> {
    let source = std::error::Error::source(error)?;
    source
        .downcast_ref::<std::io::Error>()?
        .get_ref()?
        .downcast_ref::<async_nats::rustls::Error>()
}
