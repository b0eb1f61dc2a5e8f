//! The change-event format: the contract between capture (the producer) and every consumer
//! (the push processor, the return path, external Kafka consumers). It holds the in-process
//! [`change::ChangeEvent`], the Debezium-compatible envelope, per-table schemas derived from the
//! [`Relation`], lossless PostgreSQL type mapping, Avro single-object encoding, fingerprints, the
//! decoder a consumer needs (only `schemas/` plus the `<prefix>.<pipeline>.schemas` topic) and the
//! Confluent schema-registry client ([`registry`]).
//!
//! Layout of one message value (see `schemas/README.md` for the consumer-facing rules):
//! `C3 01` + CRC-64-AVRO fingerprint of the Envelope schema (8 bytes, little-endian) + the Avro
//! binary `sb.<pipeline>.<schema>.<table>.Envelope {before, after, source, op, ts_ms}`. Keys are a
//! `...Key` record of the key columns, single-object encoded too (empty for TRUNCATE and keyless
//! tables, to be written as a null Kafka key like Debezium does). With a schema registry
//! ([`registry`]) key and value are reframed in place to the Confluent wire format
//! (`00` + 4-byte big-endian schema id + the same datum).
//!
//! Hot path: schemas are built, canonicalised, fingerprinted and validated once per relation
//! version; each event is then written straight to Avro binary from the PostgreSQL text form
//! (no `apache_avro::types::Value`, no JSON). The decoder uses `apache_avro`, so every test that
//! decodes also checks the hand-written binary against the published schema.

pub mod change;
mod convert;
mod decode;
// The fuzz crate (ops/fuzz) compiles this module tree without the service's HTTP/config stack.
#[cfg(not(fuzzing))]
pub mod registry;
mod schema;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::event::change::{ChangeEvent, Column, Op, Relation, Row, Source, Value};
use convert::{Written, parse_array, write_bytes, write_long};
use schema::{FieldPlan, Shape};

pub use convert::decimal_to_string;
pub use decode::{DecodeError, SchemaResolver, decode, decode_with_fingerprint};
pub use schema::{
    SOURCE_NAME, UNCHANGED_NAME, UNCHANGED_SYMBOL, canonical_form, fingerprint_hex, fingerprint64,
    parse_fingerprint_hex, sanitize_name, source_schema_json, table_namespace,
    unchanged_schema_json,
};

/// First two bytes of an Avro single-object encoded message.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// First byte of a Confluent wire-format message (then a 4-byte big-endian schema id).
pub const CONFLUENT_MAGIC: u8 = 0;

/// How messages are framed in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// Avro single-object encoding (`C3 01` + fingerprint): no registry needed.
    SingleObject,
    /// Confluent wire format (`00` + schema id) when `log.kafka.schema_registry` is set. The
    /// encoder always produces single-object bytes; [`registry::ConfluentFramer`] registers the
    /// event's schemas and reframes them in place.
    Confluent,
}

/// Reframes a single-object message for the Confluent wire format with the registry's schema id.
/// `None` if `single_object` is not a single-object message.
pub fn to_confluent(single_object: &[u8], schema_id: u32) -> Option<Vec<u8>> {
    if single_object.len() < 10 || single_object[..2] != SINGLE_OBJECT_MAGIC {
        return None;
    }
    let mut out = Vec::with_capacity(single_object.len() - 5);
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(&single_object[10..]);
    Some(out)
}

/// Kafka-legal topic name part: characters outside `[A-Za-z0-9._-]` become `_`.
fn topic_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `<prefix>.<pipeline>.<schema>.<table>` (each part made Kafka-legal).
pub fn topic_name(prefix: &str, pipeline: &str, schema: &str, table: &str) -> String {
    format!(
        "{}.{}.{}.{}",
        topic_part(prefix),
        topic_part(pipeline),
        topic_part(schema),
        topic_part(table)
    )
}

/// `<prefix>.<pipeline>.schemas`: compacted; key = fingerprint hex, value = schema JSON.
pub fn schemas_topic(prefix: &str, pipeline: &str) -> String {
    format!("{}.{}.schemas", topic_part(prefix), topic_part(pipeline))
}

/// Why an event could not be encoded. All variants are data problems of this one event (send it
/// to the dead-letter path); none is fixed by retrying.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{table}.{column} ({pg_type}): {reason}: {text:?}")]
    InvalidValue {
        table: String,
        column: String,
        pg_type: String,
        reason: String,
        /// The offending text, truncated to 100 characters.
        text: String,
    },
    #[error("{table}: {image} row image has {got} values but the relation has {expected} columns")]
    RowShape {
        table: String,
        image: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{table}: op {op} needs the {image} row image")]
    MissingImage {
        table: String,
        op: &'static str,
        image: &'static str,
    },
    #[error("{table}: key column {column} has no value (NULL or unchanged TOAST in every image)")]
    KeyUnavailable { table: String, column: String },
    #[error("{table}.{column}: unchanged TOAST value for a type that cannot be TOASTed")]
    UnexpectedUnchanged { table: String, column: String },
    #[error("{table}: generated schema is invalid (a bug): {reason}")]
    Schema { table: String, reason: String },
    #[error("schema record {key}: {reason}")]
    Preload { key: String, reason: String },
}

impl EncodeError {
    /// False: encoding depends only on the event, so a retry fails the same way.
    pub fn is_retryable(&self) -> bool {
        match self {
            EncodeError::InvalidValue { .. }
            | EncodeError::RowShape { .. }
            | EncodeError::MissingImage { .. }
            | EncodeError::KeyUnavailable { .. }
            | EncodeError::UnexpectedUnchanged { .. }
            | EncodeError::Schema { .. }
            | EncodeError::Preload { .. } => false,
        }
    }
}

/// One encoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEvent {
    /// Single-object encoded `...Key` record; empty for TRUNCATE and tables without key columns
    /// (write it as a null Kafka key).
    pub key: Vec<u8>,
    /// Single-object encoded `...Envelope` record.
    pub value: Vec<u8>,
    /// Schemas not emitted before by this encoder, `(fingerprint hex, schema JSON)`, key schema
    /// first: append them to the schemas topic before the event.
    pub new_schemas: Vec<(String, String)>,
    pub key_fingerprint: Option<u64>,
    pub value_fingerprint: u64,
    /// JSON of the `...Key` schema (`None` without key columns), shared per relation version: what
    /// a schema registry needs whether or not the schema is in `new_schemas`.
    pub key_schema: Option<Arc<str>>,
    /// JSON of the `...Envelope` schema.
    pub value_schema: Arc<str>,
}

/// Schemas and write plans of one relation version.
#[derive(Debug)]
struct Plan {
    relation: Arc<Relation>,
    table: String,
    value_fields: Vec<FieldPlan>,
    key_fields: Vec<FieldPlan>,
    envelope_fp: u64,
    envelope_json: Arc<str>,
    key: Option<(u64, Arc<str>)>,
}

/// A schema ready to publish: fingerprint, extended canonical form (collision check), JSON.
struct Finished {
    fp: u64,
    ext: String,
    json: String,
}

fn finish(table: &str, schema: &serde_json::Value) -> Result<Finished, EncodeError> {
    let err = |reason: String| EncodeError::Schema {
        table: table.to_string(),
        reason,
    };
    // Validate once per relation version that apache_avro (and so consumers) accept it.
    apache_avro::Schema::parse(schema).map_err(|e| err(e.to_string()))?;
    let pcf = canonical_form(schema, false).map_err(err)?;
    let ext = canonical_form(schema, true).map_err(err)?;
    Ok(Finished {
        fp: fingerprint64(pcf.as_bytes()),
        ext,
        json: schema.to_string(),
    })
}

/// Encodes change events of one pipeline; caches schemas per relation version.
#[derive(Debug)]
pub struct Encoder {
    pipeline: String,
    plans: HashMap<(u32, u32), Arc<Plan>>,
    last: Option<Arc<Plan>>,
    /// Fingerprint → extended canonical form of every schema emitted or preloaded.
    known: HashMap<u64, String>,
    emitted: HashSet<u64>,
    warned: HashSet<(u32, String)>,
}

impl Encoder {
    pub fn new(pipeline: &str) -> Self {
        Encoder {
            pipeline: pipeline.to_string(),
            plans: HashMap::new(),
            last: None,
            known: HashMap::new(),
            emitted: HashSet::new(),
            warned: HashSet::new(),
        }
    }

    /// Registers a record already in the schemas topic (call for each at startup): it is not
    /// re-emitted, and a later schema whose fingerprint would collide with it (same canonical
    /// form, different logical types, e.g. `ALTER COLUMN ... TYPE timestamptz` from `timestamp`)
    /// gets renamed records instead of overwriting it.
    pub fn preload_schema(&mut self, key: &str, json: &str) -> Result<(), EncodeError> {
        let err = |reason: String| EncodeError::Preload {
            key: key.to_string(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        let fp = fingerprint64(canonical_form(&v, false).map_err(err)?.as_bytes());
        if parse_fingerprint_hex(key) != Some(fp) {
            return Err(err(format!(
                "key is not the fingerprint {}",
                fingerprint_hex(fp)
            )));
        }
        self.known
            .insert(fp, canonical_form(&v, true).map_err(err)?);
        self.emitted.insert(fp);
        Ok(())
    }

    /// Forgets which schemas were emitted, so they are returned again in `new_schemas`. Call it
    /// when appending `new_schemas` to the schemas topic failed (re-appending is harmless: the
    /// topic is compacted by fingerprint).
    pub fn forget_emitted(&mut self) {
        self.emitted.clear();
    }

    fn plan_for(&mut self, rel: &Arc<Relation>) -> Result<Arc<Plan>, EncodeError> {
        if let Some(p) = &self.last
            && Arc::ptr_eq(&p.relation, rel)
        {
            return Ok(p.clone());
        }
        let plan = match self.plans.get(&(rel.oid, rel.version)) {
            Some(p) if Arc::ptr_eq(&p.relation, rel) || *p.relation == **rel => p.clone(),
            _ => {
                let p = Arc::new(self.build_plan(rel)?);
                self.plans.insert((rel.oid, rel.version), p.clone());
                p
            }
        };
        self.last = Some(plan.clone());
        Ok(plan)
    }

    fn build_plan(&mut self, rel: &Arc<Relation>) -> Result<Plan, EncodeError> {
        let table = format!("{}.{}", rel.schema, rel.name);
        let collides = |known: &HashMap<u64, String>, f: &Finished| {
            known.get(&f.fp).is_some_and(|ext| *ext != f.ext)
        };
        let mut suffix: Option<String> = None;
        let (ts, envelope, key) = loop {
            let ts = schema::table_schemas(&self.pipeline, rel, suffix.as_deref());
            let envelope = finish(&table, &ts.envelope)?;
            let key = ts.key.as_ref().map(|k| finish(&table, k)).transpose()?;
            let collision = collides(&self.known, &envelope)
                || key.as_ref().is_some_and(|k| collides(&self.known, k));
            match (collision, &suffix) {
                (false, _) => break (ts, envelope, key),
                (true, None) => {
                    // Deterministic: derived from the full (logical) shape of this version.
                    let h = fingerprint64(envelope.ext.as_bytes());
                    suffix = Some(format!("{:08x}", h >> 32));
                }
                (true, Some(_)) => {
                    return Err(EncodeError::Schema {
                        table,
                        reason: "schema fingerprint collides even after renaming".into(),
                    });
                }
            }
        };
        for f in ts.value_fields.iter().filter(|f| f.unmapped) {
            let col = &rel.columns[f.column];
            if self.warned.insert((rel.oid, col.name.clone())) {
                tracing::warn!(
                    table = %table,
                    column = %col.name,
                    pg_type = %col.type_name,
                    "no Avro mapping for this type: encoding its PostgreSQL text form as a string"
                );
            }
        }
        self.known.insert(envelope.fp, envelope.ext);
        if let Some(k) = &key {
            self.known.insert(k.fp, k.ext.clone());
        }
        Ok(Plan {
            relation: rel.clone(),
            table,
            value_fields: ts.value_fields,
            key_fields: ts.key_fields,
            envelope_fp: envelope.fp,
            envelope_json: Arc::from(envelope.json),
            key: key.map(|k| (k.fp, Arc::from(k.json))),
        })
    }

    /// Encodes key and value. `new_schemas` lists schemas this encoder has not emitted before
    /// (fingerprint hex → schema JSON): append them to the `<prefix>.<pipeline>.schemas` topic
    /// BEFORE appending the event itself.
    pub fn encode(&mut self, event: &ChangeEvent) -> Result<EncodedEvent, EncodeError> {
        let plan = self.plan_for(&event.relation)?;
        let p = &*plan;
        let missing = |image| EncodeError::MissingImage {
            table: p.table.clone(),
            op: event.op.code(),
            image,
        };
        for (image, row) in [("before", &event.before), ("after", &event.after)] {
            if let Some(r) = row
                && r.len() != p.relation.columns.len()
            {
                return Err(EncodeError::RowShape {
                    table: p.table.clone(),
                    image,
                    got: r.len(),
                    expected: p.relation.columns.len(),
                });
            }
        }
        let (primary, secondary) = match event.op {
            Op::Create | Op::Read | Op::Update => (
                Some(event.after.as_ref().ok_or_else(|| missing("after"))?),
                event.before.as_ref(),
            ),
            Op::Delete => (
                Some(event.before.as_ref().ok_or_else(|| missing("before"))?),
                event.after.as_ref(),
            ),
            Op::Truncate => (None, None),
        };

        let mut key = Vec::new();
        let mut key_fingerprint = None;
        if let (Some((kfp, _)), Some(primary)) = (&p.key, primary) {
            key.reserve(32);
            key.extend_from_slice(&SINGLE_OBJECT_MAGIC);
            key.extend_from_slice(&kfp.to_le_bytes());
            for f in &p.key_fields {
                let col = &p.relation.columns[f.column];
                let mut v = &primary[f.column];
                // A TOASTed key column unchanged by an UPDATE: take it from the old image.
                if matches!(v, Value::UnchangedToast)
                    && let Some(other) = secondary.map(|r| &r[f.column])
                    && matches!(other, Value::Text(_))
                {
                    v = other;
                }
                let unavailable = || EncodeError::KeyUnavailable {
                    table: p.table.clone(),
                    column: col.name.clone(),
                };
                match v {
                    Value::UnchangedToast => return Err(unavailable()),
                    Value::Null if f.branches.null.is_none() => return Err(unavailable()),
                    _ => write_field(&p.table, col, f, v, &mut key)?,
                }
            }
            key_fingerprint = Some(*kfp);
        }

        let mut out = Vec::with_capacity(64 + 48 * p.relation.columns.len());
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&p.envelope_fp.to_le_bytes());
        write_image(p, event.before.as_ref(), &mut out)?;
        write_image(p, event.after.as_ref(), &mut out)?;
        write_source(&event.source, &p.relation, &mut out);
        write_bytes(&mut out, event.op.code().as_bytes());
        write_long(&mut out, 1);
        write_long(&mut out, event.ts_ms);

        // Marked emitted only once the event encoded, so a failed event does not swallow them.
        let mut new_schemas = Vec::new();
        let schemas = p
            .key
            .iter()
            .map(|(fp, j)| (*fp, j))
            .chain([(p.envelope_fp, &p.envelope_json)]);
        for (fp, json) in schemas {
            if self.emitted.insert(fp) {
                new_schemas.push((fingerprint_hex(fp), json.to_string()));
            }
        }
        Ok(EncodedEvent {
            key,
            value: out,
            new_schemas,
            key_fingerprint,
            value_fingerprint: p.envelope_fp,
            key_schema: p.key.as_ref().map(|(_, j)| j.clone()),
            value_schema: p.envelope_json.clone(),
        })
    }
}

/// `["null", Value]` union of a row image.
fn write_image(p: &Plan, row: Option<&Row>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let Some(row) = row else {
        write_long(out, 0);
        return Ok(());
    };
    write_long(out, 1);
    for f in &p.value_fields {
        write_field(
            &p.table,
            &p.relation.columns[f.column],
            f,
            &row[f.column],
            out,
        )?;
    }
    Ok(())
}

fn write_source(s: &Source, rel: &Relation, out: &mut Vec<u8>) {
    write_bytes(out, env!("CARGO_PKG_VERSION").as_bytes());
    write_bytes(out, s.connector.as_bytes());
    write_bytes(out, s.pipeline.as_bytes());
    write_long(out, s.commit_ts_ms);
    write_bytes(out, if s.snapshot { b"true" } else { b"false" });
    write_bytes(out, s.db.as_bytes());
    write_bytes(out, rel.schema.as_bytes());
    write_bytes(out, rel.name.as_bytes());
    match s.tx_id {
        Some(x) => {
            write_long(out, 1);
            write_long(out, i64::from(x));
        }
        None => write_long(out, 0),
    }
    write_long(out, 1);
    // LSNs are u64; the bits are kept (values above i64::MAX would read negative, never seen).
    write_long(out, s.lsn as i64);
    match &s.origin {
        Some(o) => {
            write_long(out, 1);
            write_bytes(out, o.as_bytes());
        }
        None => write_long(out, 0),
    }
}

fn write_field(
    table: &str,
    col: &Column,
    f: &FieldPlan,
    v: &Value,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let invalid = |reason: String, text: &str| EncodeError::InvalidValue {
        table: table.to_string(),
        column: col.name.clone(),
        pg_type: col.type_name.clone(),
        reason,
        text: text.chars().take(100).collect(),
    };
    match v {
        Value::Null => match f.branches.null {
            Some(i) => write_long(out, i),
            None => return Err(invalid("NULL in a non-nullable key column".into(), "")),
        },
        Value::UnchangedToast => match f.branches.unchanged {
            Some(i) => {
                write_long(out, i);
                write_long(out, 0); // the enum's only symbol
            }
            None => {
                return Err(EncodeError::UnexpectedUnchanged {
                    table: table.to_string(),
                    column: col.name.clone(),
                });
            }
        },
        Value::Text(t) => {
            let start = out.len();
            if f.branches.union {
                write_long(out, f.branches.main);
            }
            match write_shape(&f.shape, t, out).map_err(|r| invalid(r, t))? {
                Written::Value => {}
                Written::Unrepresentable => {
                    out.truncate(start);
                    let i = f
                        .branches
                        .string
                        .ok_or_else(|| invalid("value not representable".into(), t))?;
                    write_long(out, i);
                    write_bytes(out, t.as_bytes());
                }
            }
        }
    }
    Ok(())
}

fn write_shape(shape: &Shape, text: &str, out: &mut Vec<u8>) -> convert::ConvResult {
    match shape {
        Shape::Scalar(s) => s.write(text, out),
        Shape::Array(s) => {
            let Some(elems) = parse_array(text)? else {
                return Ok(Written::Unrepresentable);
            };
            if !elems.is_empty() {
                write_long(out, elems.len() as i64);
                for e in &elems {
                    match e {
                        None => write_long(out, 0),
                        Some(e) => {
                            write_long(out, 1);
                            if s.write(e, out)? == Written::Unrepresentable {
                                return Ok(Written::Unrepresentable);
                            }
                        }
                    }
                }
            }
            write_long(out, 0);
            Ok(Written::Value)
        }
    }
}
