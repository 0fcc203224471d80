//! TLS termination ([`Config::tls_cert`], [`Config::tls_key`]): the certificate chain and key
//! read from PEM files into a rustls server configuration (the `ring` provider), once, when
//! the server opens. Certificates are not reloaded: a renewed certificate takes a restart.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// The rustls server configuration of `config`, or `None` when TLS is not configured; an
/// error names the flag or the file at fault.
pub(crate) fn server_config(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    let (cert, key) = match (&config.tls_cert, &config.tls_key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(
                "--tls-cert (IVY_TLS_CERT) is set but --tls-key (IVY_TLS_KEY) is not: TLS needs both the certificate chain and its private key"
                    .into(),
            );
        }
        (None, Some(_)) => {
            return Err(
                "--tls-key (IVY_TLS_KEY) is set but --tls-cert (IVY_TLS_CERT) is not: TLS needs both the certificate chain and its private key"
                    .into(),
            );
        }
    };
    let chain = read_chain(cert)?;
    let key_der = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("the TLS certificate {} and key {} cannot be used together: {e}", cert.display(), key.display()))?;
    // Only HTTP/1.1 is served (WebSockets upgrade from it).
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))
}

/// The certificates of a PEM file, the server's first (then its intermediates).
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, "certificate (--tls-cert)")?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the TLS certificate file {} is not valid PEM: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("the TLS certificate file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display()));
    }
    Ok(chain)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path, "key (--tls-key)")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("the TLS key file {} holds no PEM private key (-----BEGIN PRIVATE KEY-----)", path.display())
        }
        e => format!("the TLS key file {} is not a valid PEM private key: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_or_neither_and_errors_name_the_file() {
        assert!(server_config(&Config::default()).unwrap().is_none());
        let e = server_config(&Config::default().tls_cert(Some("/c.pem".into()))).unwrap_err();
        assert!(e.contains("--tls-key") && e.contains("is not"), "{e}");
        let e = server_config(&Config::default().tls_key(Some("/k.pem".into()))).unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("is not"), "{e}");
        let dir = std::env::temp_dir().join(format!("ivy-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let missing = dir.join("missing.pem");
        let e = server_config(&Config::default().tls_cert(Some(missing.clone())).tls_key(Some(junk.clone()))).unwrap_err();
        assert!(e.contains(&missing.display().to_string()) && e.contains("cannot read"), "{e}");
        let e = server_config(&Config::default().tls_cert(Some(junk.clone())).tls_key(Some(junk.clone()))).unwrap_err();
        assert!(e.contains(&junk.display().to_string()) && e.contains("no PEM certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
