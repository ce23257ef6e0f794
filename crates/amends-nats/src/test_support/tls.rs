//! Test certificates: a private CA, a server certificate for 127.0.0.1 and
//! localhost, and a client certificate, written as PEM files for a TLS or
//! mutual-TLS test server and its clients.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Whether a test server speaks TLS, and whether it also verifies clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// TLS with a server certificate from the private CA.
    Server,
    /// TLS, and every client must show a certificate from the private CA.
    Mutual,
}

/// The PEM files of one test server's certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The private CA's certificate: what clients trust.
    pub ca: PathBuf,
    /// The server's certificate.
    pub server_cert: PathBuf,
    /// The server's key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes a new CA and the certificates it signs, in `dir` (created).
    pub fn generate(dir: &Path) -> TlsFiles {
        fs::create_dir_all(dir).expect("create the test certificates' directory");
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server-cert.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client-cert.pem"),
            client_key: dir.join("client-key.pem"),
        };
        let ca_key = KeyPair::generate().expect("generate the test CA's key");
        let mut ca = CertificateParams::new(Vec::new()).expect("the test CA's parameters");
        ca.distinguished_name
            .push(DnType::CommonName, "amends test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the test CA");
        write(&files.ca, &ca_cert.pem());
        let issuer = Issuer::new(ca, ca_key);
        for (names, usage, cert_path, key_path) in [
            (
                vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
                ExtendedKeyUsagePurpose::ServerAuth,
                &files.server_cert,
                &files.server_key,
            ),
            (
                vec!["amends-test-client".to_owned()],
                ExtendedKeyUsagePurpose::ClientAuth,
                &files.client_cert,
                &files.client_key,
            ),
        ] {
            let key = KeyPair::generate().expect("generate a test key");
            let mut params = CertificateParams::new(names).expect("a test certificate's names");
            params.extended_key_usages = vec![usage];
            let cert = params
                .signed_by(&key, &issuer)
                .expect("sign a test certificate");
            write(cert_path, &cert.pem());
            write(key_path, &key.serialize_pem());
        }
        files
    }

    /// The `tls { }` block of a nats-server configuration for these files.
    pub(super) fn server_block(&self, mode: Tls) -> String {
        let verify = mode == Tls::Mutual;
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify}\n  timeout: 5\n}}\n",
            self.server_cert.display().to_string(),
            self.server_key.display().to_string(),
            self.ca.display().to_string(),
        )
    }
}

fn write(path: &Path, pem: &str) {
    fs::write(path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
