//! The one error type of the control-plane API: every handler, the auth layer and the fallback
//! answer failures as an RFC 9457 problem (`application/problem+json`).
//!
//! Body: `type` (`urn:syncbridge:problem:<kind>`), `title`, `status`, `detail`, and, when one
//! input was wrong, `invalid-params: [{name, reason}]`. The older members `error` (= `detail`)
//! and `kind` stay as extension members: the CLI and scripts read them. A handler returns an
//! [`ApiError`] before it changes anything, so bad input never has an effect.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Media type of a problem body (RFC 9457 §3).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One input that was wrong: a query or path parameter, or a header.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct InvalidParam {
    /// The parameter's name, e.g. `take`.
    pub name: String,
    pub reason: String,
}

/// An RFC 9457 problem details body.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:syncbridge:problem:<kind>`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong this time.
    pub detail: String,
    /// The parameter(s) that were wrong, when the problem is one input.
    #[serde(rename = "invalid-params", skip_serializing_if = "Vec::is_empty")]
    pub invalid_params: Vec<InvalidParam>,
    /// Same as `detail` (kept for older clients).
    pub error: String,
    /// Machine-readable kind, e.g. `not_found`, `bad_request`, `not_parked`.
    pub kind: String,
}

/// A failed API request; converts into a problem response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: String,
    pub detail: String,
    pub param: Option<InvalidParam>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind: kind.into(),
            detail: detail.into(),
            param: None,
        }
    }

    /// 400: one query or path parameter is missing or wrong.
    pub fn bad_param(name: &str, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Self {
            param: Some(InvalidParam {
                name: name.to_string(),
                reason: reason.clone(),
            }),
            ..Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
        }
    }

    /// 404: no such pipeline runs in this process.
    /// The `limit` query parameter of a paged route: `default` when absent, else 1..=`max`.
    pub fn page_limit(value: Option<&String>, default: usize, max: usize) -> Result<usize, Self> {
        match value.map(|l| l.parse::<usize>()) {
            None => Ok(default),
            Some(Ok(l)) if (1..=max).contains(&l) => Ok(l),
            Some(_) => Err(Self::bad_param(
                "limit",
                format!("`limit` must be a number from 1 to {max}"),
            )),
        }
    }

    pub fn unknown_pipeline(name: &str) -> Self {
        Self {
            param: Some(InvalidParam {
                name: "name".into(),
                reason: "no pipeline of that name runs in this process".into(),
            }),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "unknown_pipeline",
                format!("no pipeline {name:?} runs in this process"),
            )
        }
    }

    /// The body this error answers with.
    pub fn problem(&self) -> Problem {
        Problem {
            type_: format!("urn:syncbridge:problem:{}", self.kind),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            invalid_params: self.param.iter().cloned().collect(),
            error: self.detail.clone(),
            kind: self.kind.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.detail, self.status)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.problem())).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        resp
    }
}

/// Unknown route: a problem body instead of axum's empty 404.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}", uri.path()),
    )
}

/// A route that exists, asked with another method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not answer {method}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn problem_body_names_the_parameter_and_keeps_error_and_kind() {
        let resp = ApiError::bad_param("take", "must be source or target").into_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "urn:syncbridge:problem:bad_request");
        assert_eq!(v["title"], "Bad Request");
        assert_eq!(v["status"], 400);
        assert_eq!(v["detail"], "must be source or target");
        assert_eq!(v["error"], v["detail"]);
        assert_eq!(v["kind"], "bad_request");
        assert_eq!(v["invalid-params"][0]["name"], "take");
    }
}
