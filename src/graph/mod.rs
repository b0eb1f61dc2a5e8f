//! The Microsoft Graph client for SharePoint lists: auth, RU-priced rate limiting, retries, typed
//! list/column/item operations and `$batch` (graph-api.md; DESIGN.md §7).
//!
//! ```text
//! caller ─▶ GraphClient op ─▶ TenantLimiter (pause? budget? slot?) ─▶ TokenProvider ─▶ HTTP
//!                  ▲                                                                   │
//!                  └──── retry policy ◀── GraphError classification ◀─────────────────┘
//! ```
//!
//! Contract:
//! - **Auth**: client credentials with a secret or a certificate ([`auth`]); the token is cached and refreshed ahead of
//!   expiry; a 401 invalidates it, refreshes once and retries the request once. SharePoint REST calls
//!   ([`sharepoint`], hyperlink writes) carry a token for the site host's resource instead, one provider per
//!   scope, cached and refreshed the same way.
//! - **Rate**: every request is priced in resource units and admitted by the tenant's shared
//!   [`TenantLimiter`] (one per tenant per process via [`LimiterRegistry`]); a 429/503 pauses the
//!   whole tenant for `Retry-After` (the larger of it and `RateLimit-Reset`); `RateLimit-*` teach
//!   it the tenant's budget and what is left of the window before a 429; concurrency is bounded.
//! - **Retries** (all bounded): 429/503 are retried after the pause for every request — the server
//!   rejects them before applying anything. Transient failures (timeouts, resets, other 5xx) are
//!   retried with exponential backoff and jitter only for idempotent requests (GET, PATCH, DELETE).
//!   Creates and `$batch` envelopes are **not** retried on transient failures, because the server
//!   may have applied them (the emulator's `reset_rate` does exactly that); the caller reconciles,
//!   e.g. by the list's unique `SyncKey`, which turns a repeated create into [`GraphError::Conflict`].
//! - **Errors** are classified ([`GraphError`]): retryable, auth, 412, 404, conflict, other 4xx
//!   (dead-letter).
//! - **Decoration**: `User-Agent: NONISV|SyncBridge|SyncBridge/<version>` and a fresh
//!   `client-request-id` per attempt, logged at debug with method, path (no query), status and
//!   Graph's `request-id`; results carry both ids as [`Lineage`].
//! - **Secrets** are never logged ([`crate::config::Secret`]); query strings are not logged either,
//!   since `$filter` values can hold row data.
//!
//! Not here: provisioning from the mapping and column diffing ([`crate::process::provision`]
//! builds on [`GraphClient::list_columns`] / [`GraphClient::create_list`]).

pub mod auth;
pub mod batch;
pub mod client;
pub mod error;
pub mod limiter;
#[cfg(test)]
mod limiter_props;
pub mod ops;
pub mod sharepoint;
pub mod team;

pub use auth::{Certificate, Credential};
pub use batch::{BatchOutcome, BatchRequest, MAX_BATCH};
pub use client::{
    GraphClient, GraphClientConfig, GraphUsage, GraphUsageCounts, Lineage, USER_AGENT,
};
pub use error::{ErrorDetail, GraphError};
pub use limiter::{Cost, Lane, LimiterConfig, LimiterRegistry, RateLimit, TenantLimiter};
pub use ops::{ColumnDefinition, Deleted, FieldsUpdated, ItemQuery, ListInfo, ListItem, Site};
pub use team::Group;
