//! Transport-neutral responses: the same `Reply` becomes an HTTP response or a `$batch` entry.

use serde_json::{Map, Value, json};

/// Ids echoed on every response and inside every error's `innerError` (graph-api.md §0, §9.1).
#[derive(Debug, Clone)]
pub struct Ids {
    pub request_id: String,
    pub client_request_id: String,
    /// `innerError.date`: ISO-8601 without `Z`, as observed.
    pub date: String,
}

/// A Graph error: status, stable `code`, developer message, optional extra headers and inner codes.
#[derive(Debug, Clone)]
pub struct GraphError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub headers: Vec<(String, String)>,
    /// Extra keys merged into `innerError` (e.g. the throttling `throttledRequest`/`quota` chain).
    pub inner: Option<Map<String, Value>>,
}

impl GraphError {
    pub fn new(status: u16, code: &str, message: &str) -> GraphError {
        GraphError {
            status,
            code: code.into(),
            message: message.into(),
            headers: Vec::new(),
            inner: None,
        }
    }

    /// 400 `invalidRequest`, the code SharePoint uses for almost every bad payload.
    pub fn invalid(message: &str) -> GraphError {
        GraphError::new(400, "invalidRequest", message)
    }

    pub fn not_found(message: &str) -> GraphError {
        GraphError::new(404, "itemNotFound", message)
    }

    pub fn with_header(mut self, name: &str, value: String) -> GraphError {
        self.headers.push((name.into(), value));
        self
    }

    pub fn into_reply(self, ids: &Ids) -> Reply {
        let mut inner = Map::new();
        if let Some(extra) = self.inner {
            inner.extend(extra);
        }
        inner.insert("date".into(), json!(ids.date));
        inner.insert("request-id".into(), json!(ids.request_id));
        inner.insert("client-request-id".into(), json!(ids.client_request_id));
        Reply {
            status: self.status,
            headers: self.headers,
            body: Some(
                json!({ "error": { "code": self.code, "message": self.message, "innerError": inner } }),
            ),
        }
    }
}

/// A response before it is put on the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<Value>,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Some(body),
        }
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: None,
        }
    }
}

/// Either a success reply or an error, folded into a reply at the edge.
pub type GraphResult = Result<Reply, GraphError>;
