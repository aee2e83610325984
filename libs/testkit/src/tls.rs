//! A certificate authority for one test: a CA, a server certificate for the loopback address
//! and a client certificate it signed, written as PEM files into a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tempfile::TempDir;

/// The PEM files of a test's certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA's certificate: what clients trust, and what the server checks clients against.
    pub ca: PathBuf,
    /// The server's certificate (for `127.0.0.1` and `localhost`) and key.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA, and its key.
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
}

/// A CA and the certificates it signed; the files live as long as this does.
pub struct TestCa {
    /// The files.
    pub files: TlsFiles,
    dir: TempDir,
}

impl TestCa {
    /// Generates a CA, a server certificate and a client certificate.
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("capstan-tls-")
            .tempdir()
            .expect("a temporary directory for certificates");
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "capstan test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("a self-signed CA");

        let issue = |names: Vec<String>, common_name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("a key");
            let mut params = CertificateParams::new(names).expect("certificate parameters");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![usage];
            let cert = params
                .signed_by(&key, &ca_cert, &ca_key)
                .expect("a certificate signed by the CA");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = issue(
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            "capstan test server",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = issue(
            Vec::new(),
            "capstan test client",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let write = |name: &str, pem: &str| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        let files = TlsFiles {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        };
        Self { files, dir }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
