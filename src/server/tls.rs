//! TLS: rustls server configuration (TLS 1.2/1.3, forward-secret AEAD
//! suites only, ALPN h2 + http/1.1, optional client certificates) and the
//! self-signed development certificate.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::Config;

/// Marker in the development certificate's subject; a certificate carrying
/// it is refused outside dev mode.
pub const DEV_CERT_MARKER: &str = "cardvault development certificate";

/// Writes a self-signed certificate for localhost/127.0.0.1/::1 unless one
/// is there already. The key file is created with mode 0600.
pub fn ensure_dev_certificate(cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    if cert_path.exists() && key_path.exists() {
        return Ok(());
    }
    let dir = cert_path
        .parent()
        .context("certificate path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, DEV_CERT_MARKER);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    write_private(key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(cert_path, cert.pem())
        .with_context(|| format!("write {}", cert_path.display()))?;
    Ok(())
}

/// Creates (or truncates) a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("read certificate {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse certificate {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("read private key {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parse private key {}", path.display()))?
        .with_context(|| format!("no private key in {}", path.display()))
}

/// The cipher suites offered: every one has forward secrecy (ECDHE) and an
/// AEAD cipher.
fn suites() -> Vec<rustls::SupportedCipherSuite> {
    use provider::cipher_suite as cs;
    vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

/// Builds the rustls configuration from the validated config.
pub fn server_config(cfg: &Config) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert_path = cfg.tls_cert_path();
    let key_path = cfg.tls_key_path();
    let certs = load_certs(&cert_path)?;
    if !cfg.dev && contains(certs[0].as_ref(), DEV_CERT_MARKER.as_bytes()) {
        bail!(
            "refused: {} is the development certificate; use a real certificate outside dev mode",
            cert_path.display()
        );
    }
    let key = load_key(&key_path)?;
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: suites(),
        ..provider::default_provider()
    });
    let versions: &[&rustls::SupportedProtocolVersion] = if cfg.tls.min_version == "1.3" {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .context("TLS protocol versions")?;
    let builder = match &cfg.tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).context("client CA certificate")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("certificate and private key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
