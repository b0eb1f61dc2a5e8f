//! Graph failures, classified by what the caller should do next (graph-api.md §9).
//!
//! | variant | cause | caller's move |
//! |---|---|---|
//! | [`GraphError::Throttled`] | 429 (or an inner `$batch` 429) | retry after `retry_after` (the client already paused the tenant) |
//! | [`GraphError::Unavailable`] | 503 | same as throttled |
//! | [`GraphError::Transient`] | timeout, connection reset, other 5xx | retry with backoff |
//! | [`GraphError::Auth`] | 401 after one refresh, 403, token endpoint refusal | fix credentials / permissions; not retried |
//! | [`GraphError::PreconditionFailed`] | 412 (`If-Match` stale) | refetch and reapply |
//! | [`GraphError::NotFound`] | 404 | depends on the operation |
//! | [`GraphError::Conflict`] | 409, `nameAlreadyExists`, unique-value violation | reconcile (the value already exists) |
//! | [`GraphError::Client4xx`] | any other 4xx | not retryable: dead-letter the item |
//! | [`GraphError::Invalid`] | rejected client-side (e.g. a `$batch` over 20) | programming error |
//! | [`GraphError::Decode`] | a 2xx body that is not the expected shape | not retryable |
//! | [`GraphError::Target`] | `graph.team` matches no Team or several | fix the configuration |

use std::time::Duration;

use serde_json::Value;

/// The largest `Retry-After` honoured as given; larger values are clamped. SharePoint sends hundreds of
/// seconds routinely (graph-api.md §8.1), so this only guards against absurd or hostile values.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// What Graph said about a failed request: `error.code`, `error.message`, the `innerError` code chain and
/// the `request-id` (for Microsoft support and lineage).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    /// `innerError.code`, `innerError.innerError.code`, … outermost first.
    pub inner_codes: Vec<String>,
    pub request_id: Option<String>,
}

impl ErrorDetail {
    /// Parses `{"error": {"code", "message", "innerError": {...}}}`; tolerant of anything else (the
    /// body then becomes the message, truncated).
    pub fn parse(body: &[u8], request_id: Option<String>) -> ErrorDetail {
        let v: Option<Value> = serde_json::from_slice(body).ok();
        ErrorDetail::from_json(v.as_ref(), body, request_id)
    }

    /// Like [`ErrorDetail::parse`] for an already parsed body (inner `$batch` responses).
    pub fn from_json(v: Option<&Value>, raw: &[u8], request_id: Option<String>) -> ErrorDetail {
        let err = v.and_then(|v| v.get("error"));
        let Some(err) = err.filter(|e| e.is_object()) else {
            let text = String::from_utf8_lossy(raw);
            return ErrorDetail {
                message: text.chars().take(300).collect(),
                request_id,
                ..ErrorDetail::default()
            };
        };
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let mut inner_codes = Vec::new();
        let mut request_id = request_id;
        let mut cur = err.get("innerError");
        // Bounded walk: Graph nests two or three levels; never trust a body to be finite in depth.
        for _ in 0..8 {
            let Some(ie) = cur.filter(|i| i.is_object()) else {
                break;
            };
            if let Some(c) = s(ie, "code") {
                inner_codes.push(c);
            }
            if request_id.is_none() {
                request_id = s(ie, "request-id");
            }
            cur = ie.get("innerError");
        }
        ErrorDetail {
            code: s(err, "code").unwrap_or_default(),
            message: s(err, "message").unwrap_or_default(),
            inner_codes,
            request_id,
        }
    }

    fn has_code(&self, code: &str) -> bool {
        self.code.eq_ignore_ascii_case(code)
            || self
                .inner_codes
                .iter()
                .any(|c| c.eq_ignore_ascii_case(code))
    }
}

impl std::fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if !self.inner_codes.is_empty() {
            write!(f, " (inner: {})", self.inner_codes.join(" > "))?;
        }
        if let Some(r) = &self.request_id {
            write!(f, " [request-id {r}]")?;
        }
        Ok(())
    }
}

/// A failed Graph call. See the module docs for the classification.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("throttled (HTTP {status}), retry after {retry_after:?}: {detail}")]
    Throttled {
        status: u16,
        retry_after: Option<Duration>,
        detail: Box<ErrorDetail>,
    },
    #[error("service unavailable (HTTP 503), retry after {retry_after:?}: {detail}")]
    Unavailable {
        retry_after: Option<Duration>,
        detail: Box<ErrorDetail>,
    },
    #[error("transient failure{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient {
        status: Option<u16>,
        message: String,
        request_id: Option<String>,
    },
    #[error("authentication/authorization failed (HTTP {status}): {detail}")]
    Auth {
        status: u16,
        detail: Box<ErrorDetail>,
    },
    #[error("precondition failed (HTTP 412, stale eTag): {detail}")]
    PreconditionFailed { detail: Box<ErrorDetail> },
    #[error("not found (HTTP 404): {detail}")]
    NotFound { detail: Box<ErrorDetail> },
    #[error("conflict (HTTP {status}): {detail}")]
    Conflict {
        status: u16,
        detail: Box<ErrorDetail>,
    },
    #[error("request rejected (HTTP {status}) {code}: {message}{}", request_id.as_ref().map(|r| format!(" [request-id {r}]")).unwrap_or_default())]
    Client4xx {
        status: u16,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    #[error("invalid request (not sent): {0}")]
    Invalid(String),
    #[error("unexpected response body from {what}: {message}")]
    Decode { what: String, message: String },
    /// The configured site or Team does not name exactly one target (fix the configuration).
    #[error("target not found: {0}")]
    Target(String),
}

impl GraphError {
    /// Worth retrying the same request later (throttling, unavailability, transient transport/5xx).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            GraphError::Throttled { .. }
                | GraphError::Unavailable { .. }
                | GraphError::Transient { .. }
        )
    }

    /// A throttling signal (429/503): the tenant must pause, not just this request.
    pub fn is_throttling(&self) -> bool {
        matches!(
            self,
            GraphError::Throttled { .. } | GraphError::Unavailable { .. }
        )
    }

    /// `Retry-After` carried by a 429/503, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GraphError::Throttled { retry_after, .. }
            | GraphError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, when the failure came from a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            GraphError::Throttled { status, .. }
            | GraphError::Auth { status, .. }
            | GraphError::Conflict { status, .. }
            | GraphError::Client4xx { status, .. } => Some(*status),
            GraphError::Unavailable { .. } => Some(503),
            GraphError::Transient { status, .. } => *status,
            GraphError::PreconditionFailed { .. } => Some(412),
            GraphError::NotFound { .. } => Some(404),
            GraphError::Invalid(_) | GraphError::Decode { .. } | GraphError::Target(_) => None,
        }
    }

    /// Short label for metrics (`outcome`).
    pub fn kind(&self) -> &'static str {
        match self {
            GraphError::Throttled { .. } => "throttled",
            GraphError::Unavailable { .. } => "unavailable",
            GraphError::Transient { .. } => "transient",
            GraphError::Auth { .. } => "auth",
            GraphError::PreconditionFailed { .. } => "precondition_failed",
            GraphError::NotFound { .. } => "not_found",
            GraphError::Conflict { .. } => "conflict",
            GraphError::Client4xx { .. } => "client_error",
            GraphError::Invalid(_) => "invalid",
            GraphError::Decode { .. } => "decode",
            GraphError::Target(_) => "target",
        }
    }

    /// Classifies a non-2xx Graph response (direct or inner `$batch`).
    ///
    /// `retry_after` is the already combined wait (the larger of `Retry-After` and `RateLimit-Reset`).
    pub fn from_response(
        status: u16,
        retry_after: Option<Duration>,
        detail: ErrorDetail,
    ) -> GraphError {
        let detail = Box::new(detail);
        match status {
            429 => GraphError::Throttled {
                status,
                retry_after,
                detail,
            },
            // 503 without Retry-After is still a throttling signal per §8.1; the caller backs off.
            503 => GraphError::Unavailable {
                retry_after,
                detail,
            },
            401 | 403 => GraphError::Auth { status, detail },
            404 => GraphError::NotFound { detail },
            409 => GraphError::Conflict { status, detail },
            412 => GraphError::PreconditionFailed { detail },
            // SharePoint reports a unique-column violation as 400 invalidRequest with this message
            // (graph-api.md §12 lists the exact body as unconfirmed; the emulator uses this wording).
            400 if detail.has_code("nameAlreadyExists")
                || detail.message.contains("duplicate values") =>
            {
                GraphError::Conflict { status, detail }
            }
            400..=499 => GraphError::Client4xx {
                status,
                code: detail.code.clone(),
                message: detail.message.clone(),
                request_id: detail.request_id.clone(),
            },
            // Throttling dressed as 5xx (list-view threshold can surface as 500) is still transient.
            _ => GraphError::Transient {
                status: Some(status),
                message: detail.to_string(),
                request_id: detail.request_id.clone(),
            },
        }
    }

    /// Classifies a transport failure (no response).
    pub fn from_transport(e: &reqwest::Error) -> GraphError {
        // Without a response we cannot know whether the server applied the request; callers of
        // non-idempotent operations (creates) must reconcile (see the module docs of `graph`).
        let what = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connect"
        } else {
            "transport"
        };
        GraphError::Transient {
            status: None,
            message: format!("{what}: {e}"),
            request_id: None,
        }
    }
}

/// Parses `Retry-After`: decimal seconds (`2.128`, graph-api.md §8.1) or an HTTP-date. Negative,
/// non-finite or unparsable values give `None`; values above [`MAX_RETRY_AFTER`] are clamped.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        return Some(Duration::from_secs_f64(
            secs.min(MAX_RETRY_AFTER.as_secs_f64()),
        ));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = (when.timestamp_millis() - chrono::Utc::now().timestamp_millis()).max(0);
    Some(Duration::from_millis(ms as u64).min(MAX_RETRY_AFTER))
}

/// The wait a throttled response asks for: the larger of `Retry-After` and `RateLimit-Reset`
/// (graph-api.md §8.6: "if Retry-After is smaller, honour the larger").
pub fn throttle_wait(retry_after: Option<&str>, ratelimit_reset: Option<&str>) -> Option<Duration> {
    let a = retry_after.and_then(parse_retry_after);
    let b = ratelimit_reset.and_then(parse_retry_after);
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn retry_after_parses_decimals_and_rejects_garbage() {
        assert_eq!(parse_retry_after("41"), Some(Duration::from_secs(41)));
        assert_eq!(
            parse_retry_after(" 2.128 "),
            Some(Duration::from_millis(2128))
        );
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("999999"), Some(MAX_RETRY_AFTER));
        // A date in the past means "now".
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn throttle_wait_takes_the_larger() {
        assert_eq!(
            throttle_wait(Some("5"), Some("31")),
            Some(Duration::from_secs(31))
        );
        assert_eq!(
            throttle_wait(Some("31"), Some("5")),
            Some(Duration::from_secs(31))
        );
        assert_eq!(throttle_wait(None, Some("7")), Some(Duration::from_secs(7)));
        assert_eq!(throttle_wait(Some("x"), None), None);
    }

    #[test]
    fn error_body_walks_inner_chain_and_keeps_request_id() {
        let body = json!({"error": {"code": "activityLimitReached", "message": "The request has been throttled",
            "innerError": {"code": "throttledRequest", "innerError": {"code": "quota"},
                           "date": "2025-01-01T00:00:00", "request-id": "rid-1"}}});
        let d = ErrorDetail::parse(body.to_string().as_bytes(), None);
        assert_eq!(d.code, "activityLimitReached");
        assert_eq!(d.inner_codes, vec!["throttledRequest", "quota"]);
        assert_eq!(d.request_id.as_deref(), Some("rid-1"));
        // The header's request-id wins over the body's.
        let d = ErrorDetail::parse(body.to_string().as_bytes(), Some("hdr".into()));
        assert_eq!(d.request_id.as_deref(), Some("hdr"));
        // Non-JSON bodies keep some text.
        let d = ErrorDetail::parse(b"<html>bad gateway</html>", None);
        assert_eq!(d.code, "");
        assert!(d.message.contains("bad gateway"));
    }

    #[test]
    fn classification() {
        let d = |code: &str, msg: &str| ErrorDetail {
            code: code.into(),
            message: msg.into(),
            ..ErrorDetail::default()
        };
        let ra = Some(Duration::from_secs(3));
        let e = GraphError::from_response(429, ra, d("activityLimitReached", ""));
        assert!(e.is_retryable() && e.is_throttling());
        assert_eq!(e.retry_after(), ra);
        let e = GraphError::from_response(503, None, d("serviceNotAvailable", ""));
        assert!(matches!(e, GraphError::Unavailable { .. }) && e.is_retryable());
        let e = GraphError::from_response(500, None, d("generalException", ""));
        assert!(
            matches!(
                e,
                GraphError::Transient {
                    status: Some(500),
                    ..
                }
            ) && e.is_retryable()
        );
        let e = GraphError::from_response(504, None, d("", ""));
        assert!(e.is_retryable() && !e.is_throttling());
        let e = GraphError::from_response(401, None, d("InvalidAuthenticationToken", ""));
        assert!(matches!(e, GraphError::Auth { status: 401, .. }) && !e.is_retryable());
        assert!(matches!(
            GraphError::from_response(403, None, d("accessDenied", "")),
            GraphError::Auth { status: 403, .. }
        ));
        assert!(matches!(
            GraphError::from_response(412, None, d("resourceModified", "")),
            GraphError::PreconditionFailed { .. }
        ));
        assert!(matches!(
            GraphError::from_response(404, None, d("itemNotFound", "")),
            GraphError::NotFound { .. }
        ));
        assert!(matches!(
            GraphError::from_response(409, None, d("conflict", "")),
            GraphError::Conflict { status: 409, .. }
        ));
        assert!(matches!(
            GraphError::from_response(
                400,
                None,
                d(
                    "invalidRequest",
                    "... duplicate values were found in the following field(s) ..."
                )
            ),
            GraphError::Conflict { status: 400, .. }
        ));
        assert!(matches!(
            GraphError::from_response(400, None, d("nameAlreadyExists", "")),
            GraphError::Conflict { .. }
        ));
        let e = GraphError::from_response(400, None, d("invalidRequest", "Invalid request"));
        match &e {
            GraphError::Client4xx { status, code, .. } => {
                assert_eq!((*status, code.as_str()), (400, "invalidRequest"))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!e.is_retryable());
        assert!(!GraphError::Invalid("x".into()).is_retryable());
    }
}
