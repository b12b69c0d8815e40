//! TLS on both hops, with rustls.
//!
//! Agent side: a client that insists on TLS (e.g. `sslmode=require`) is served with the
//! daemon's certificate: the one configured (`client_tls`), or one the daemon issues itself at
//! start for `localhost`/`127.0.0.1`/`::1`. Upstream side: per target, `disable`, `require`
//! (encrypted, server not verified, as libpq's `require`) or `verify-full` (chain to the CA file
//! and name checked).

use rustls::{
    ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime, pem::PemObject,
    },
};
use serde::Deserialize;
use std::{path::Path, sync::Arc};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("issuing the daemon's certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("verify-full needs tls_ca_file")]
    NoCa,
}

/// How the daemon talks TLS to an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    #[default]
    Disable,
    /// Encrypt; do not verify the server (libpq's `require`).
    Require,
    /// Encrypt, verify the chain against the CA file and the server name.
    VerifyFull,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The agent-side acceptor: the configured certificate and key, or a self-issued one.
pub fn acceptor(cert_and_key: Option<(&Path, &Path)>) -> Result<TlsAcceptor, TlsError> {
    let (chain, key) = match cert_and_key {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| file_err(cert, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(cert, e))?;
            (
                chain,
                PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?,
            )
        }
        None => {
            let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
            let issued = rcgen::generate_simple_self_signed(names)?;
            let key =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der()));
            (vec![issued.cert.der().clone()], key)
        }
    };
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The upstream connector for `mode` (`None` for `disable`).
pub fn connector(
    mode: UpstreamTls,
    ca_file: Option<&Path>,
) -> Result<Option<TlsConnector>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match mode {
        UpstreamTls::Disable => return Ok(None),
        UpstreamTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
            .with_no_client_auth(),
        UpstreamTls::VerifyFull => {
            let ca = ca_file.ok_or(TlsError::NoCa)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
                roots.add(cert.map_err(|e| file_err(ca, e))?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// The name to verify (and send as SNI) for an upstream.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|e| TlsError::File {
        path: "tls_server_name".into(),
        message: e.to_string(),
    })
}

/// `require`: any certificate is accepted (no chain or name check), but the handshake
/// signatures are still checked, so the session key really belongs to whoever holds that key.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
