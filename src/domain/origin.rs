//! Web origins (`scheme://host[:port]`) as browsers serialise them: the
//! parent page allowed to embed a hosted capture page, and the vault's own
//! public address.
//!
//! The parser is strict on purpose. What it accepts ends up in a
//! `Content-Security-Policy: frame-ancestors` directive and as a
//! `postMessage` target, so anything a browser would read more loosely than
//! we do (paths, wildcards, credentials, IPv6 literals, which CSP source
//! expressions cannot name) is refused rather than normalised away.

use std::fmt;
use std::net::Ipv4Addr;

/// Why an origin was refused. The messages never echo the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("must be an origin such as https://shop.example.com (at most 200 characters)")]
    Shape,
    #[error("must start with https:// (http:// only for localhost or 127.0.0.1)")]
    Scheme,
    #[error("must be an origin only: no path (not even a trailing /), query or fragment")]
    Path,
    #[error("must not contain credentials")]
    Credentials,
    #[error("must not contain wildcards")]
    Wildcard,
    #[error("IPv6 literals are not supported; use a host name")]
    Ipv6,
    #[error("has an invalid host name")]
    Host,
    #[error("has an invalid port")]
    Port,
    #[error("http:// is only allowed for localhost and 127.0.0.1; use https://")]
    InsecureHttp,
}

/// A parsed origin in canonical form: lower-case scheme and host, default
/// port dropped, exactly as `window.location.origin` would show it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WebOrigin {
    https: bool,
    host: String,
    port: Option<u16>,
}

const MAX_LEN: usize = 200;

impl WebOrigin {
    /// Parses an origin. `http://` is accepted only for loopback hosts
    /// (`localhost`, `127.0.0.0/8`), for local development.
    pub fn parse(input: &str) -> Result<WebOrigin, OriginError> {
        if input.is_empty()
            || input.len() > MAX_LEN
            || !input.is_ascii()
            || input
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(OriginError::Shape);
        }
        let lower = input.to_ascii_lowercase();
        let (https, rest) = if let Some(rest) = lower.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = lower.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(OriginError::Scheme);
        };
        if rest.contains('@') {
            return Err(OriginError::Credentials);
        }
        if rest.contains('*') {
            return Err(OriginError::Wildcard);
        }
        if rest.contains(['/', '?', '#', '\\']) {
            return Err(OriginError::Path);
        }
        if rest.starts_with('[') {
            return Err(OriginError::Ipv6);
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(parse_port(port)?)),
            None => (rest, None),
        };
        check_host(host)?;
        let loopback =
            host == "localhost" || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
        if !https && !loopback {
            return Err(OriginError::InsecureHttp);
        }
        let default_port = if https { 443 } else { 80 };
        Ok(WebOrigin {
            https,
            host: host.to_string(),
            port: port.filter(|p| *p != default_port),
        })
    }

    pub fn is_https(&self) -> bool {
        self.https
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

fn parse_port(port: &str) -> Result<u16, OriginError> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OriginError::Port);
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(OriginError::Port),
    }
}

/// A DNS name (letters, digits and hyphens in labels of 1-63 characters) or
/// a dotted-quad IPv4 address. A name made only of numeric labels must be a
/// valid IPv4 address, so `1.2.3` is not read as a host name.
fn check_host(host: &str) -> Result<(), OriginError> {
    if host.is_empty() || host.len() > 253 {
        return Err(OriginError::Host);
    }
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !labels.iter().all(label_ok) {
        return Err(OriginError::Host);
    }
    let numeric = labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if numeric && host.parse::<Ipv4Addr>().is_err() {
        return Err(OriginError::Host);
    }
    Ok(())
}

impl fmt::Display for WebOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        match self.port {
            Some(p) => write!(f, "{scheme}://{}:{p}", self.host),
            None => write!(f, "{scheme}://{}", self.host),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn canon(s: &str) -> String {
        WebOrigin::parse(s).unwrap().to_string()
    }

    #[test]
    fn accepts_and_canonicalises_origins() {
        assert_eq!(
            canon("https://shop.example.com"),
            "https://shop.example.com"
        );
        assert_eq!(
            canon("HTTPS://Shop.Example.COM"),
            "https://shop.example.com"
        );
        assert_eq!(
            canon("https://shop.example.com:443"),
            "https://shop.example.com"
        );
        assert_eq!(
            canon("https://shop.example.com:8443"),
            "https://shop.example.com:8443"
        );
        assert_eq!(canon("http://localhost:3000"), "http://localhost:3000");
        assert_eq!(canon("http://127.0.0.1:80"), "http://127.0.0.1");
        assert_eq!(canon("http://127.1.2.3:9"), "http://127.1.2.3:9");
        assert_eq!(canon("https://10.0.0.5"), "https://10.0.0.5");
        assert_eq!(canon("https://intranet"), "https://intranet");
        assert!(WebOrigin::parse("https://x.example").unwrap().is_https());
    }

    #[test]
    fn refuses_what_is_not_a_plain_origin() {
        use OriginError::*;
        let cases = [
            ("", Shape),
            ("shop.example.com", Scheme),
            ("ftp://shop.example.com", Scheme),
            ("//shop.example.com", Scheme),
            ("https://shop.example.com/", Path),
            ("https://shop.example.com/checkout", Path),
            ("https://shop.example.com?x=1", Path),
            ("https://shop.example.com#x", Path),
            ("https://user:pw@shop.example.com", Credentials),
            ("https://*.example.com", Wildcard),
            ("https://[::1]:8443", Ipv6),
            ("https://shop_example.com", Host),
            ("https://-shop.example.com", Host),
            ("https://shop..example.com", Host),
            ("https://1.2.3", Host),
            ("https://300.1.1.1", Host),
            ("https://", Host),
            ("https://shop.example.com:", Port),
            ("https://shop.example.com:0", Port),
            ("https://shop.example.com:65536", Port),
            ("https://shop.example.com:+1", Port),
            ("http://shop.example.com", InsecureHttp),
            ("http://10.0.0.1", InsecureHttp),
            ("https://shop.example.com extra", Shape),
            ("https://bücher.example", Shape),
        ];
        for (input, want) in cases {
            assert_eq!(WebOrigin::parse(input), Err(want), "{input:?}");
        }
        let long = format!("https://{}.example.com", "a".repeat(200));
        assert_eq!(WebOrigin::parse(&long), Err(Shape));
    }
}
