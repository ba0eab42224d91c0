//! HTTP client connections for the load engine: plain or TLS (rustls, aws-lc-rs, optional client certificate),
//! HTTP/1.1 with keep-alive or h2 (by ALPN), one request in flight per connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use crate::load::{Body, Conn, Connector};

/// Where system CAs live on Debian, used when no CA file is given for `https`.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS client options.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM bundle of CAs that may sign the server certificate (default: the system bundle).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key: Option<PathBuf>,
}

/// A parsed, resolved base URL plus how to talk to it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// What goes into `Host` / `:authority` and into the signature: the port only when it is not the default.
    pub authority: String,
    pub addr: SocketAddr,
    pub http2: bool,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl Endpoint {
    /// Parses `http[s]://host[:port]` (a trailing path is refused: the XKS URI path is given separately) and
    /// resolves the host once, so name lookups stay out of the measurement.
    pub async fn new(base_url: &str, tls: &TlsOptions, http2: bool) -> anyhow::Result<Endpoint> {
        let (https, rest) = if let Some(r) = base_url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = base_url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("the URL must start with http:// or https://: {base_url}");
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.is_empty() {
            bail!("give the base URL as scheme://host[:port]; the URI path goes in --uri-path");
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = split_host_port(rest, default_port)?;
        let authority = if port == default_port { bracket(&host) } else { format!("{}:{port}", bracket(&host)) };
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .with_context(|| format!("{host} resolves to no address"))?;
        if !https && (tls.ca_file.is_some() || tls.client_cert.is_some()) {
            bail!("TLS options were given for a plain http:// URL");
        }
        let tls = if https {
            let name = ServerName::try_from(host.clone()).with_context(|| format!("{host} is not a valid TLS name"))?;
            Some((Arc::new(client_config(tls, http2)?), name))
        } else {
            None
        };
        Ok(Endpoint { https, host, port, authority, addr, http2, tls })
    }

    /// The request target: origin-form on HTTP/1.1 (with a `Host` header), absolute on h2 so hyper sends
    /// `:authority`.
    pub fn uri(&self, path: &str) -> String {
        if self.http2 {
            format!("{}://{}{path}", if self.https { "https" } else { "http" }, self.authority)
        } else {
            path.to_owned()
        }
    }

    /// Opens one connection.
    pub async fn connect(&self) -> anyhow::Result<HttpConn> {
        let tcp = TcpStream::connect(self.addr).await.with_context(|| format!("cannot connect to {}", self.addr))?;
        // Requests are small and latency-bound: Nagle would add delayed-ACK stalls.
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => handshake(tcp, self.http2).await,
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {} failed", self.authority))?;
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                if self.http2 && alpn.as_deref() != Some(b"h2") {
                    bail!("the server did not agree to h2 (ALPN)");
                }
                handshake(tls, self.http2).await
            }
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_owned() }
}

fn split_host_port(s: &str, default_port: u16) -> anyhow::Result<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').context("unclosed [ in the URL")?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().context("bad port")?,
            None if tail.is_empty() => default_port,
            None => bail!("bad URL authority {s}"),
        };
        return Ok((h.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_owned(), p.parse().context("bad port")?)),
        None => Ok((s.to_owned(), default_port)),
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// TLS 1.3/1.2 over aws-lc-rs, the same provider as the server, with ALPN for the chosen HTTP version.
pub fn client_config(opts: &TlsOptions, http2: bool) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = opts.ca_file.clone().unwrap_or_else(|| PathBuf::from(SYSTEM_CAS));
    for c in read_certs(&ca)? {
        roots.add(c).with_context(|| format!("unusable CA certificate in {}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match (&opts.client_cert, &opts.client_key) {
        (Some(cert), Some(key)) => {
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("cannot read {}", key.display()))?;
            builder
                .with_client_auth_cert(read_certs(cert)?, key)
                .context("the client certificate and key do not match")?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("mutual TLS needs both a client certificate and its key"),
    };
    config.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    Ok(config)
}

async fn handshake<S>(io: S, h2: bool) -> anyhow::Result<HttpConn>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.context("h2 handshake")?;
        // The connection task ends when the sender is dropped or the peer closes; the sender then reports it.
        tokio::spawn(conn);
        Ok(HttpConn::H2(tx))
    } else {
        let (tx, conn) = http1::handshake(TokioIo::new(io)).await.context("HTTP/1.1 handshake")?;
        tokio::spawn(conn);
        Ok(HttpConn::H1(tx))
    }
}

/// One client connection.
#[derive(Debug)]
pub enum HttpConn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl HttpConn {
    /// Sends a request and reads the whole answer.
    pub async fn roundtrip(&mut self, req: http::Request<Body>) -> anyhow::Result<(u16, Bytes)> {
        let resp = match self {
            HttpConn::H1(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
            HttpConn::H2(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

impl Conn for HttpConn {
    async fn send(&mut self, req: http::Request<Body>) -> anyhow::Result<(u16, Bytes)> {
        self.roundtrip(req).await
    }
}

/// The engine's connector over an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct HttpConnector(pub Arc<Endpoint>);

impl Connector for HttpConnector {
    type Conn = HttpConn;
    async fn connect(&self) -> anyhow::Result<HttpConn> {
        self.0.connect().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("a.example:8443", 443).unwrap(), ("a.example".into(), 8443));
        assert_eq!(split_host_port("a.example", 443).unwrap(), ("a.example".into(), 443));
        assert_eq!(split_host_port("[::1]:9", 80).unwrap(), ("::1".into(), 9));
        assert_eq!(split_host_port("[::1]", 80).unwrap(), ("::1".into(), 80));
        assert!(split_host_port("h:x", 80).is_err());
    }

    #[test]
    fn client_certificates_load_and_alpn_follows_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::gateway::write_pki(dir.path()).unwrap();
        let mtls = TlsOptions {
            ca_file: Some(pki.ca.clone()),
            client_cert: Some(pki.cert.clone()),
            client_key: Some(pki.key.clone()),
        };
        let c = client_config(&mtls, true).unwrap();
        assert!(c.client_auth_cert_resolver.has_certs());
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
        let c = client_config(&TlsOptions { ca_file: Some(pki.ca.clone()), ..TlsOptions::default() }, false).unwrap();
        assert!(!c.client_auth_cert_resolver.has_certs());
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let half = TlsOptions { client_key: None, ..mtls };
        assert!(client_config(&half, false).is_err(), "a certificate without its key is refused");
    }

    #[tokio::test]
    async fn authority_drops_the_default_port_only() {
        let e = Endpoint::new("http://127.0.0.1:80", &TlsOptions::default(), false).await.unwrap();
        assert_eq!(e.authority, "127.0.0.1");
        assert_eq!(e.uri("/p"), "/p");
        let e = Endpoint::new("http://127.0.0.1:8080/", &TlsOptions::default(), true).await.unwrap();
        assert_eq!(e.authority, "127.0.0.1:8080");
        assert_eq!(e.uri("/p"), "http://127.0.0.1:8080/p");
        assert!(Endpoint::new("http://127.0.0.1:8080/kms", &TlsOptions::default(), false).await.is_err());
        assert!(Endpoint::new("ftp://x", &TlsOptions::default(), false).await.is_err());
    }
}
