//! How to reach a deployment: NATS servers, authentication, TLS, the subject
//! prefix and the partition count.

use std::fmt;
use std::path::PathBuf;

use amends_core::route::Partitions;

use amends_core::protocol::Prefix;

/// The settings of [`crate::Client::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// NATS server URLs, e.g. `nats://127.0.0.1:4222`; the client picks one
    /// and fails over to the others.
    pub servers: Vec<String>,
    /// How the client authenticates.
    pub auth: Auth,
    /// TLS settings; the defaults use TLS only when a URL or the server
    /// asks for it.
    pub tls: Tls,
    /// The deployment's subject prefix (protocol: "Subjects").
    pub prefix: Prefix,
    /// The deployment's partition count. `None`: read it from the key
    /// `partitions` of the `<PREFIX>_META` bucket on connect, so that the
    /// client can never route with a count other than the deployment's.
    pub partitions: Option<Partitions>,
    /// The connection name the server shows in its monitoring.
    pub name: Option<String>,
}

impl Options {
    /// Options for one server, no authentication, the default prefix, and
    /// the partition count read from the deployment.
    pub fn new(server: impl Into<String>) -> Options {
        Options {
            servers: vec![server.into()],
            auth: Auth::None,
            tls: Tls::default(),
            prefix: Prefix::default(),
            partitions: None,
            name: None,
        }
    }
}

/// How the client authenticates to NATS.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token.
    Token(String),
    /// A `.creds` file (a user JWT and its nkey seed), as made by `nsc`.
    CredsFile(PathBuf),
    /// An nkey seed (`SU...`).
    NkeySeed(String),
}

// Secrets are never printed.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::CredsFile(path) => f.debug_tuple("CredsFile").field(path).finish(),
            Auth::NkeySeed(_) => f.write_str("NkeySeed(<redacted>)"),
        }
    }
}

/// TLS settings.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Tls {
    /// Refuse to connect without TLS.
    pub required: bool,
    /// A PEM file of CA certificates to trust, in addition to the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for servers that verify clients.
    pub client_cert: Option<ClientCert>,
}

/// A client certificate for mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The PEM certificate (chain).
    pub cert_file: PathBuf,
    /// The PEM private key.
    pub key_file: PathBuf,
}
