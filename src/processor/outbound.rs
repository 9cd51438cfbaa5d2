//! Outbound HTTP(S) for card data and webhooks: one place that decides
//! which URLs may be called and which CAs are trusted.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

/// The system CA bundle (Debian/Ubuntu path; override with a `ca_file`).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// True for a loopback IP literal (127.0.0.0/8, ::1).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks an outbound URL: https, or http to a loopback address only.
pub fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|_| "not a valid absolute URL".to_string())?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("URLs must not carry credentials".to_string());
    }
    let host = parsed.host_str().unwrap_or("");
    match parsed.scheme() {
        "https" if !host.is_empty() => Ok(parsed),
        "http" if is_loopback_host(host) => Ok(parsed),
        "http" => Err(
            "http:// is only allowed to loopback addresses (127.0.0.1, ::1); use https".to_string(),
        ),
        _ => Err("the URL must be https".to_string()),
    }
}

/// A client with explicit roots, no redirects (a redirect could move card
/// data to another host) and no proxy from the environment.
pub fn client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(connect_timeout)
        .timeout(timeout);
    let bundle = match ca_file {
        Some(path) => {
            Some(std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?)
        }
        // No system bundle (minimal containers): only loopback http works.
        None => std::fs::read(SYSTEM_CA_BUNDLE).ok(),
    };
    if let Some(pem) = bundle {
        for cert in
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("CA bundle: {e}"))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| format!("HTTP client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://hooks.example.com/x").is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("http://[::1]:9000/hook").is_ok());
        assert!(check_url("http://example.com/hook").is_err());
        assert!(check_url("http://10.0.0.1/hook").is_err());
        assert!(check_url("ftp://example.com").is_err());
        assert!(check_url("https://user:pw@example.com").is_err());
        assert!(check_url("not a url").is_err());
    }
}
