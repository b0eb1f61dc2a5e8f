//! SyncBridge keeps PostgreSQL tables and SharePoint / Teams lists in sync through Microsoft Graph.
//!
//! Modules follow the data path:
//! - [`config`]: pipeline YAML → parse → validate (no IO, every problem at once) → typed config.
//! - [`capture`]: PostgreSQL logical replication and snapshots → change events appended to the log.
//! - [`event`]: the change-event format, the contract between capture and its consumers: the
//!   in-process change event, the Debezium-style envelope, Avro schemas, encoder and decoder,
//!   fingerprints and the Confluent schema-registry client.
//! - [`log`]: the durable event log (`EventLog`): Kafka in production, embedded by default.
//! - [`process`]: the push processor: consume the log, map and route rows, content-hash ledger,
//!   write to the lists, dead letters, list provisioning.
//! - [`graph`]: the Microsoft Graph client: auth, RU-priced per-tenant limiter, retries, list/item ops, `$batch`.
//! - [`pull`]: the return path: delta pollers, return processor, conflicts and their resolution,
//!   PostgreSQL applier.
//! - [`runtime`]: runs pipelines: one cancellation tree, inputs drained before their consumers.
//! - [`reload`]: hot reload of the pipeline files (`SIGHUP`, `run --watch`): validate, compare,
//!   refuse what cannot apply live, restart only the changed pipelines.
//! - [`control`]: the control-plane HTTP server (`/health`, `/ready`, `/metrics`) and pipeline API
//!   (re-snapshots, conflicts).
//! - [`telemetry`]: tracing setup and the one module of metric names.
//! - [`emulator`]: an offline Microsoft Graph for SharePoint lists (tests, demos, users without a tenant).
//! - [`pg`]: PostgreSQL client connections with libpq's TLS semantics (`sslmode`, `sslrootcert`).
//!
//! Delivery guarantees (the contract every stage keeps):
//! - A progress marker (replication LSN, log offset, delta token) moves only after the step downstream
//!   of it is durable, so a crash at any point re-delivers, never loses.
//! - Re-delivered events are absorbed downstream (content-hash ledger, idempotent creates), so the
//!   end result is exactly-once in effect: nothing lost, nothing duplicated.
//! - Every queue on the data path is bounded; a slow stage slows the ones before it.
#![doc(html_root_url = "https://docs.rs/syncbridge")]

pub mod capture;
pub mod config;
pub mod control;
pub mod emulator;
pub mod event;
pub mod graph;
pub mod log;
pub mod pg;
pub mod process;
pub mod pull;
pub mod reload;
pub mod runtime;
pub mod telemetry;
