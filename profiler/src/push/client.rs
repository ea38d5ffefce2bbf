//! One blocking HTTP client for the sender thread: `POST {url}/push.v1.PusherService/Push`
//! as a Connect unary call with a protobuf body, and what the answer means for the request.
//!
//! TLS is rustls with the webpki root certificates (ureq's `tls` feature): certificates and
//! host names are verified, without depending on the system's OpenSSL or CA bundle.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;

use super::{PushSettings, PushTiming};

/// The path of the push method, after the base URL.
pub const PUSH_PATH: &str = "/push.v1.PusherService/Push";

const USER_AGENT: &str = concat!("cprof/", env!("CARGO_PKG_VERSION"));

/// What an attempt means for the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: delivered.
    Delivered,
    /// A 4xx other than 408 and 429: the same request will never be accepted.
    Refused { status: u16, message: String },
    /// 5xx, 408, 429, 3xx or a network error: try again later.
    Retry { reason: String },
}

/// Classifies an HTTP status.
pub fn outcome(status: u16, first_line: &str) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        408 | 429 => Outcome::Retry {
            reason: format!("HTTP {status} {first_line}"),
        },
        400..=499 => Outcome::Refused {
            status,
            message: first_line.to_owned(),
        },
        // 5xx, and 1xx/3xx: a redirect means a wrong URL, so the request is kept until the
        // operator fixes it rather than dropped.
        _ => Outcome::Retry {
            reason: format!("HTTP {status} {first_line}"),
        },
    }
}

/// How a credential file is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// `user:password`, sent as `Authorization: Basic <base64>`.
    Basic,
    /// A token, sent as `Authorization: Bearer <token>`.
    Bearer,
}

/// A credential read from a file, re-read before each request so that rotated tokens are
/// picked up; when a re-read fails the last good value is kept.
#[derive(Debug)]
struct Credential {
    kind: CredentialKind,
    path: PathBuf,
    /// The whole `Authorization` header value.
    header: String,
}

impl Credential {
    fn load(kind: CredentialKind, path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            kind,
            path: path.to_owned(),
            header: read_credential(kind, path)?,
        })
    }

    fn refresh(&mut self) {
        match read_credential(self.kind, &self.path) {
            Ok(header) => self.header = header,
            Err(err) => tracing::warn!("{err:#}; keeping the credential read before"),
        }
    }
}

/// The `Authorization` value from a credential file: `user:password` for basic auth, a token
/// for bearer auth, on one line (a final newline is allowed).
fn read_credential(kind: CredentialKind, path: &Path) -> anyhow::Result<String> {
    let what = match kind {
        CredentialKind::Basic => "basic auth file",
        CredentialKind::Bearer => "bearer token file",
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    credential_header(kind, &text)
        .map_err(|reason| anyhow!("the {what} {} {reason}", path.display()))
}

/// The `Authorization` value from the text of a credential file, or why the text cannot be one
/// (`is empty`, ...). The value never holds a control character: no header can be injected.
pub fn credential_header(kind: CredentialKind, text: &str) -> Result<String, &'static str> {
    let line = text.strip_suffix('\n').unwrap_or(text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.trim().is_empty() {
        return Err("is empty");
    }
    if line.chars().any(char::is_control) {
        return Err("must hold one line without control characters");
    }
    Ok(match kind {
        CredentialKind::Basic => {
            if !line.contains(':') {
                return Err("must hold user:password");
            }
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(line)
            )
        }
        CredentialKind::Bearer => format!("Bearer {}", line.trim()),
    })
}

/// The HTTP side of the pusher.
pub struct Client {
    agent: ureq::Agent,
    endpoint: String,
    credential: Option<Credential>,
    tenant: Option<String>,
}

impl Client {
    /// Validates the URL and reads the credential files.
    pub fn new(settings: &PushSettings, timing: &PushTiming) -> anyhow::Result<Self> {
        let url = settings.url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("push URL {url:?}: expected an http:// or https:// URL");
        }
        let credential = match (&settings.basic_auth_file, &settings.bearer_token_file) {
            (Some(_), Some(_)) => bail!("use either basic auth or a bearer token, not both"),
            (Some(path), None) => Some(Credential::load(CredentialKind::Basic, path)?),
            (None, Some(path)) => Some(Credential::load(CredentialKind::Bearer, path)?),
            (None, None) => None,
        };
        if let Some(tenant) = &settings.tenant
            && (tenant.is_empty() || tenant.chars().any(char::is_control))
        {
            bail!("push tenant {tenant:?}: expected a non-empty string without control characters");
        }
        if plain_http_off_host(url) {
            tracing::warn!(
                "push URL {url} is plain http to another host: profiles{} travel unencrypted; use https://",
                if credential.is_some() {
                    " and credentials"
                } else {
                    ""
                }
            );
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timing.connect_timeout)
            .timeout(timing.request_timeout)
            .user_agent(USER_AGENT)
            .redirects(0)
            .build();
        Ok(Self {
            agent,
            endpoint: format!("{url}{PUSH_PATH}"),
            credential,
            tenant: settings.tenant.clone(),
        })
    }

    /// Sends one request body.
    pub fn push(&mut self, body: &[u8]) -> Outcome {
        let mut request = self
            .agent
            .post(&self.endpoint)
            .set("Content-Type", "application/proto")
            .set("Connect-Protocol-Version", "1");
        if let Some(credential) = &mut self.credential {
            credential.refresh();
            request = request.set("Authorization", &credential.header);
        }
        if let Some(tenant) = &self.tenant {
            request = request.set("X-Scope-OrgID", tenant);
        }
        match request.send_bytes(body) {
            Ok(response) => {
                let status = response.status();
                let location = response.header("Location").map(str::to_owned);
                let line = first_line(response);
                match outcome(status, &line) {
                    Outcome::Retry { reason } => Outcome::Retry {
                        reason: match location {
                            Some(location) => {
                                format!("{reason} (redirects to {location}: set that URL)")
                            }
                            None => reason,
                        },
                    },
                    other => other,
                }
            }
            Err(ureq::Error::Status(status, response)) => outcome(status, &first_line(response)),
            Err(ureq::Error::Transport(transport)) => Outcome::Retry {
                reason: transport.to_string(),
            },
        }
    }
}

/// Whether `url` is `http://` to a host other than loopback.
fn plain_http_off_host(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(bracketed) = host.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or(bracketed)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// The first line of a response body (at most 4 KiB are read), for logs.
fn first_line(response: ureq::Response) -> String {
    let mut body = Vec::new();
    let _ = response.into_reader().take(4096).read_to_end(&mut body);
    let text = String::from_utf8_lossy(&body);
    let line = text.lines().next().unwrap_or("").trim();
    line.chars().take(300).collect()
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("credential", &self.credential.as_ref().map(|c| &c.path))
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_to_another_host_is_noticed() {
        assert!(plain_http_off_host("http://pyroscope:4040"));
        assert!(plain_http_off_host("http://10.0.0.1:4040/x"));
        assert!(!plain_http_off_host("http://127.0.0.1:4040"));
        assert!(!plain_http_off_host("http://localhost:4040"));
        assert!(!plain_http_off_host("http://[::1]:4040"));
        assert!(!plain_http_off_host("https://pyroscope:4040"));
    }

    fn test_file(name: &str, contents: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("cprof-push-cred-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn settings(basic: Option<PathBuf>, bearer: Option<PathBuf>) -> PushSettings {
        PushSettings {
            url: "http://127.0.0.1:1".into(),
            basic_auth_file: basic,
            bearer_token_file: bearer,
            tenant: None,
        }
    }

    fn error(settings: &PushSettings) -> String {
        format!(
            "{:#}",
            Client::new(settings, &PushTiming::default()).unwrap_err()
        )
    }

    #[test]
    fn credential_headers() {
        let basic = test_file("basic", b"user:pa ss\n");
        let bearer = test_file("bearer", b"tok3n\r\n");
        assert_eq!(
            read_credential(CredentialKind::Basic, &basic).unwrap(),
            "Basic dXNlcjpwYSBzcw=="
        );
        assert_eq!(
            read_credential(CredentialKind::Bearer, &bearer).unwrap(),
            "Bearer tok3n"
        );
        std::fs::remove_file(basic).unwrap();
        std::fs::remove_file(bearer).unwrap();
    }

    #[test]
    fn credential_file_errors_name_the_file() {
        let missing = std::env::temp_dir().join("cprof-push-cred-does-not-exist");
        let err = error(&settings(Some(missing.clone()), None));
        assert!(
            err.starts_with("cannot read the basic auth file ")
                && err.contains(&*missing.to_string_lossy()),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");

        let empty = test_file("empty", b"\n");
        let err = error(&settings(None, Some(empty.clone())));
        assert_eq!(
            err,
            format!("the bearer token file {} is empty", empty.display())
        );

        let two_lines = test_file("two-lines", b"a\nb\n");
        let err = error(&settings(None, Some(two_lines.clone())));
        assert!(err.contains("one line"), "{err}");

        let no_colon = test_file("no-colon", b"user\n");
        let err = error(&settings(Some(no_colon.clone()), None));
        assert!(err.contains("must hold user:password"), "{err}");

        let err = error(&settings(Some(no_colon.clone()), Some(empty.clone())));
        assert!(err.contains("not both"), "{err}");
        for f in [empty, two_lines, no_colon] {
            std::fs::remove_file(f).unwrap();
        }
    }

    #[test]
    fn refresh_keeps_the_last_good_credential() {
        let path = test_file("rotate", b"one\n");
        let mut credential = Credential::load(CredentialKind::Bearer, &path).unwrap();
        std::fs::write(&path, b"two\n").unwrap();
        credential.refresh();
        assert_eq!(credential.header, "Bearer two");
        std::fs::remove_file(&path).unwrap();
        credential.refresh();
        assert_eq!(credential.header, "Bearer two");
    }

    #[test]
    fn bad_url_is_refused() {
        let mut s = settings(None, None);
        s.url = "pyroscope:4040".into();
        assert!(error(&s).contains("expected an http:// or https:// URL"));
    }

    #[test]
    fn statuses() {
        assert_eq!(outcome(200, ""), Outcome::Delivered);
        assert_eq!(outcome(204, ""), Outcome::Delivered);
        assert_eq!(
            outcome(400, "{\"code\":\"invalid_argument\"}"),
            Outcome::Refused {
                status: 400,
                message: "{\"code\":\"invalid_argument\"}".into()
            }
        );
        assert!(matches!(
            outcome(401, ""),
            Outcome::Refused { status: 401, .. }
        ));
        assert!(matches!(outcome(408, ""), Outcome::Retry { .. }));
        assert!(matches!(outcome(429, ""), Outcome::Retry { .. }));
        assert!(matches!(outcome(503, ""), Outcome::Retry { .. }));
        assert!(matches!(outcome(308, ""), Outcome::Retry { .. }));
    }

    #[test]
    fn https_does_not_accept_a_plain_http_answer() {
        use std::io::Write as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        });
        let mut s = settings(None, None);
        s.url = format!("https://127.0.0.1:{port}");
        let mut client = Client::new(&s, &PushTiming::default()).unwrap();
        let outcome = client.push(b"x");
        assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
        server.join().unwrap();
    }

    #[test]
    fn network_error_is_retried() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let mut client = Client::new(&settings(None, None), &PushTiming::default()).unwrap();
        assert!(matches!(client.push(b"x"), Outcome::Retry { .. }));
    }
}
