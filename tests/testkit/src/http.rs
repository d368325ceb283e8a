//! A plain HTTP/1.1 client (hyper, no S3 or Kubernetes library): what a customer's browser or
//! the service's backend does with the API and with presigned URLs. One fresh connection per
//! request, optionally from a chosen loopback address (to look like another client to
//! per-address rate limits).

use std::net::{Ipv4Addr, SocketAddr};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// Why a request failed (transport only; HTTP error statuses are returned, not errors).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is unusable.
    #[error("parse URL {url}: {message}")]
    ParseUrl {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// Connecting failed.
    #[error("connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        source: std::io::Error,
    },
    /// Building, sending or reading the request failed.
    #[error("{method} {url}: {message}")]
    Exchange {
        /// Method.
        method: String,
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
}

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers (lowercase names).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on a fresh connection.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<Response, HttpError> {
    request_from(None, method, url, headers, body).await
}

/// [`request`] from `source` (any of 127.0.0.0/8 works on Linux) when given.
pub async fn request_from(
    source: Option<Ipv4Addr>,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<Response, HttpError> {
    let exchange = |message: String| HttpError::Exchange {
        method: method.to_string(),
        url: strip_query(url),
        message,
    };
    let uri: hyper::Uri =
        url.parse()
            .map_err(|e: hyper::http::uri::InvalidUri| HttpError::ParseUrl {
                url: strip_query(url),
                message: e.to_string(),
            })?;
    let host = uri
        .host()
        .ok_or_else(|| HttpError::ParseUrl {
            url: strip_query(url),
            message: "no host".into(),
        })?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = connect(source, &host, port)
        .await
        .map_err(|source| HttpError::Connect {
            url: strip_query(url),
            source,
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| exchange(e.to_string()))?;
    tokio::spawn(conn);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("{host}:{port}"));
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| exchange(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| exchange(e.to_string()))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| exchange(e.to_string()))?
        .to_bytes()
        .to_vec();
    Ok(Response {
        status,
        headers,
        body,
    })
}

async fn connect(
    source: Option<Ipv4Addr>,
    host: &str,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(ip) = source else {
        return tokio::net::TcpStream::connect((host, port)).await;
    };
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((ip, 0)))?;
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| std::io::Error::other(format!("{host} has no IPv4 address")))?;
    socket.connect(addr).await
}

/// A URL without its query string (presigned URLs carry signatures there; keep them out of
/// error messages).
pub fn strip_query(url: &str) -> String {
    url.split('?').next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_never_carry_presigned_signatures() {
        assert_eq!(
            strip_query("http://h:1/b/k?X-Amz-Signature=abc"),
            "http://h:1/b/k"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_naming_the_url() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let err = request(
            "GET",
            &format!("http://127.0.0.1:{port}/x?sig=1"),
            &[],
            vec![],
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}/x")), "{err}");
        assert!(!err.contains("sig=1"), "{err}");
    }
}
