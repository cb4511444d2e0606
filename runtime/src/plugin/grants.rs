//! Capability grants: what a plugin may reach beyond its sandbox, from its `[plugins.NAME]`
//! table. Nothing is granted by default.
//!
//! - `allowed_hosts`: outgoing HTTP (`wasi:http`) to these origins only. Every request is
//!   checked here, before any connection is made; a refused one fails in the plugin with
//!   `HTTP-request-denied` and weir's log names the plugin, method and URL.
//! - `headers`: added by the host to requests to a granted origin (credentials from
//!   secrets), so the plugin never holds them.
//! - `files`: read-only folders, seen by the plugin under `/files/NAME`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiHttpHooks};

use super::{LogLine, LogSink};

/// `scheme://host[:port]` a plugin may send requests to; `port` `None` is any port (`:*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
}

impl Origin {
    /// Parse `https://api.example.com`, `http://127.0.0.1:8080` or `http://127.0.0.1:*`.
    pub fn parse(text: &str) -> Result<Origin, String> {
        let (scheme, rest) =
            text.split_once("://").ok_or_else(|| format!("`{text}` is not an origin like https://api.example.com"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("`{text}`: only http and https origins can be granted"));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) || rest.is_empty() {
            return Err(format!("`{text}`: an origin is scheme, host and port only (no path, query or user)"));
        }
        // `[v6]:port` or `host:port`; no port is the scheme's own
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6.split_once(']').ok_or_else(|| format!("`{text}`: unclosed `[`"))?;
                (h, after.strip_prefix(':'))
            }
            None => match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            },
        };
        let port = match port {
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| format!("`{text}`: the port must be a number or `*`"))?),
            None => Some(if scheme == "https" { 443 } else { 80 }),
        };
        if host.is_empty() || host.contains('*') {
            return Err(format!("`{text}`: name one host (wildcard hosts are not granted)"));
        }
        Ok(Origin { scheme, host: host.to_ascii_lowercase(), port })
    }

    fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.scheme == scheme && self.host == host && self.port.is_none_or(|p| p == port)
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}://{}:{p}", self.scheme, self.host),
            None => write!(f, "{}://{}:*", self.scheme, self.host),
        }
    }
}

/// A header the host adds to granted requests.
#[derive(Clone)]
pub struct GrantedHeader {
    pub name: http::HeaderName,
    pub value: http::HeaderValue,
    /// Only to this origin; `None`: to every granted origin.
    pub origin: Option<Origin>,
}

impl std::fmt::Debug for GrantedHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the value is a credential: never printed
        f.debug_struct("GrantedHeader").field("name", &self.name).field("origin", &self.origin).finish()
    }
}

/// A read-only folder, seen by the plugin at `guest`.
#[derive(Debug, Clone)]
pub struct FileGrant {
    pub host: PathBuf,
    pub guest: String,
}

/// Everything granted to one plugin.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// The plugin's name in the pipeline file, for messages.
    pub plugin: String,
    pub allowed_hosts: Vec<Origin>,
    pub headers: Vec<GrantedHeader>,
    pub files: Vec<FileGrant>,
}

impl Grants {
    /// Refuse a component that imports what it was not granted, naming the grant to add.
    pub fn check_imports(&self, imports: &[String]) -> Result<(), String> {
        if self.allowed_hosts.is_empty() {
            if let Some(i) = imports.iter().find(|i| i.starts_with("wasi:http/")) {
                return Err(format!(
                    "it imports `{i}` (outgoing HTTP), which is not granted: add `allowed_hosts = [\"https://HOST\"]` to [plugins.{}] with the origins it may call",
                    self.plugin
                ));
            }
        }
        Ok(())
    }
}

/// Requests a plugin instance made, as the host counts them.
#[derive(Debug, Default, Clone, Copy)]
pub struct HttpCounts {
    pub sent: u64,
    pub denied: u64,
}

/// The `wasi:http` hooks of one instance: the origin check and the granted headers.
pub struct HttpHooks {
    pub grants: Arc<Grants>,
    pub log: LogSink,
    pub counts: HttpCounts,
    /// When the current call must end: no request outlives it.
    pub deadline: Option<Instant>,
}

/// Refused requests named in the log per instance; later ones are only counted.
const DENIED_LOGGED: u64 = 20;

type Body = UnsyncBoxBody<Bytes, HttpError>;
type Sent = Box<
    dyn Future<
            Output = Result<(http::Response<Body>, Box<dyn Future<Output = Result<(), HttpError>> + Send>), HttpError>,
        > + Send,
>;

impl HttpHooks {
    fn refuse(&mut self, method: &http::Method, uri: &http::Uri, why: &str) -> Sent {
        self.counts.denied += 1;
        if self.counts.denied <= DENIED_LOGGED {
            let more = if self.counts.denied == DENIED_LOGGED { " (further refusals are only counted)" } else { "" };
            (self.log)(&LogLine {
                level: "warn",
                message: format!("plugin `{}`: refused {method} {}: {why}{more}", self.grants.plugin, shown_uri(uri)),
                own: false,
            });
        }
        Box::new(async { Err(HttpError::HttpRequestDenied) })
    }
}

/// A URL for the log: without its query (which may carry tokens), cut to a sane length.
fn shown_uri(uri: &http::Uri) -> String {
    let mut s = format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.authority().map(|a| a.as_str()).unwrap_or("?"),
        uri.path()
    );
    if uri.query().is_some() {
        s.push_str("?…");
    }
    if s.len() > 200 {
        let cut = (0..=200).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<Body>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Sent {
        let _ = fut;
        let uri = request.uri().clone();
        let method = request.method().clone();
        let scheme = uri.scheme_str().unwrap_or("").to_ascii_lowercase();
        let Some(authority) = uri.authority() else { return self.refuse(&method, &uri, "it names no host") };
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
        let Some(origin) = self.grants.allowed_hosts.iter().find(|o| o.allows(&scheme, &host, port)) else {
            let why = if self.grants.allowed_hosts.is_empty() {
                "no allowed_hosts are granted to it".to_string()
            } else {
                format!("{scheme}://{host}:{port} is not in its allowed_hosts")
            };
            return self.refuse(&method, &uri, &why);
        };
        let left = match self.deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(30),
        };
        if left.is_zero() {
            // the call is over: the guest is stopped at its next instruction anyway
            return Box::new(async { Err(HttpError::ConnectionTimeout) });
        }
        self.counts.sent += 1;
        for h in &self.grants.headers {
            if h.origin.as_ref().is_none_or(|o| o == origin) {
                request.headers_mut().insert(h.name.clone(), h.value.clone());
            }
        }
        // no wait outlives the plugin's call: the guest is stopped at its deadline anyway
        let cap = |d: Option<Duration>| Some(d.unwrap_or(left).min(left));
        let options = RequestOptions {
            connect_timeout: cap(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout)),
        };
        Box::new(async move {
            use http_body_util::BodyExt;
            let (res, io) = wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((res.map(BodyExt::boxed_unsync), Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_and_match() {
        let o = Origin::parse("https://API.example.com").unwrap();
        assert_eq!(o, Origin { scheme: "https".into(), host: "api.example.com".into(), port: Some(443) });
        assert!(o.allows("https", "api.example.com", 443));
        assert!(!o.allows("http", "api.example.com", 443));
        assert!(!o.allows("https", "api.example.com.evil.net", 443));
        let any = Origin::parse("http://127.0.0.1:*").unwrap();
        assert!(any.allows("http", "127.0.0.1", 1) && any.allows("http", "127.0.0.1", 65535));
        assert!(!any.allows("http", "127.0.0.2", 80));
        assert_eq!(Origin::parse("http://[::1]:8080").unwrap().host, "::1");
        for bad in
            ["api.example.com", "ftp://h", "https://h/path", "https://*.example.com", "https://u@h", "http://h:x"]
        {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
    }
}
