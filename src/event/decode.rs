//! Consumer side: resolve a single-object encoded message's CRC-64-AVRO fingerprint to its writer
//! schema, using only the `.avsc` files of `schemas/` and the records of the compacted
//! `<prefix>.<pipeline>.schemas` topic (key = fingerprint hex, value = schema JSON), then decode.
//! Never panics on arbitrary bytes (fuzzed with the encoder).

use std::collections::HashMap;
use std::path::Path;

use apache_avro::Schema;
use apache_avro::types::Value;

use super::schema::{canonical_form, fingerprint_hex, fingerprint64, parse_fingerprint_hex};
use super::{CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC};

/// Decoding failures. None is retryable: the bytes or the schemas are wrong and will stay so.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message too short for an Avro header ({0} bytes)")]
    TooShort(usize),
    #[error("message is in the Confluent wire format (schema id {0}); a schema registry is needed")]
    NeedsRegistry(u32),
    #[error("not an Avro single-object message (header {0:02x?})")]
    BadMagic([u8; 2]),
    #[error(
        "unknown schema fingerprint {0}: not in schemas/ nor in the schemas topic records given"
    )]
    UnknownFingerprint(String),
    #[error("body does not match its schema: {0}")]
    Body(String),
    #[error("{0} trailing bytes after the Avro datum")]
    TrailingBytes(usize),
    #[error("invalid schema {origin}: {reason}")]
    Schema { origin: String, reason: String },
    #[error("schemas topic key {key} is not the fingerprint of its schema ({actual})")]
    FingerprintMismatch { key: String, actual: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl DecodeError {
    /// Always false: decoding problems are data or configuration problems.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Fingerprint → writer schema, from `schemas/*.avsc` files and schemas-topic records.
#[derive(Debug, Default)]
pub struct SchemaResolver {
    schemas: HashMap<u64, Schema>,
}

impl SchemaResolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every `*.avsc` file of `dir` (each a self-contained schema).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, DecodeError> {
        let dir = dir.as_ref();
        let io = |e, p: &Path| DecodeError::Io {
            path: p.display().to_string(),
            source: e,
        };
        let mut r = Self::new();
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| io(e, dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
            .collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|e| io(e, &p))?;
            r.add_schema_json_from(&text, &p.display().to_string())?;
        }
        Ok(r)
    }

    /// Adds a schema; returns its fingerprint.
    pub fn add_schema_json(&mut self, json: &str) -> Result<u64, DecodeError> {
        self.add_schema_json_from(json, "(inline)")
    }

    fn add_schema_json_from(&mut self, json: &str, origin: &str) -> Result<u64, DecodeError> {
        let bad = |reason: String| DecodeError::Schema {
            origin: origin.to_string(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let pcf = canonical_form(&value, false).map_err(bad)?;
        let schema = Schema::parse(&value).map_err(|e| bad(e.to_string()))?;
        let fp = fingerprint64(pcf.as_bytes());
        self.schemas.insert(fp, schema);
        Ok(fp)
    }

    /// Adds one record of the schemas topic, checking that the key is the schema's fingerprint.
    /// A later record for the same key replaces the earlier one (compacted-topic semantics).
    pub fn add_topic_record(&mut self, key: &str, value: &str) -> Result<u64, DecodeError> {
        let mut probe = Self::new();
        let fp = probe.add_schema_json_from(value, &format!("schemas topic key {key}"))?;
        if parse_fingerprint_hex(key) != Some(fp) {
            return Err(DecodeError::FingerprintMismatch {
                key: key.to_string(),
                actual: fingerprint_hex(fp),
            });
        }
        self.schemas.extend(probe.schemas);
        Ok(fp)
    }

    pub fn get(&self, fingerprint: u64) -> Option<&Schema> {
        self.schemas.get(&fingerprint)
    }

    pub fn len(&self) -> usize {
        self.schemas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.schemas.is_empty()
    }
}

/// Decodes an Avro single-object encoded message (`C3 01` + 8-byte little-endian CRC-64-AVRO
/// fingerprint + Avro binary datum).
pub fn decode(bytes: &[u8], resolver: &SchemaResolver) -> Result<Value, DecodeError> {
    decode_with_fingerprint(bytes, resolver).map(|(_, v)| v)
}

/// [`decode`], also returning the writer schema's fingerprint.
pub fn decode_with_fingerprint(
    bytes: &[u8],
    resolver: &SchemaResolver,
) -> Result<(u64, Value), DecodeError> {
    if bytes.first() == Some(&CONFLUENT_MAGIC) && bytes.len() >= 5 {
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        return Err(DecodeError::NeedsRegistry(id));
    }
    if bytes.len() < 10 {
        return Err(DecodeError::TooShort(bytes.len()));
    }
    if bytes[..2] != SINGLE_OBJECT_MAGIC {
        return Err(DecodeError::BadMagic([bytes[0], bytes[1]]));
    }
    let mut fp_bytes = [0u8; 8];
    fp_bytes.copy_from_slice(&bytes[2..10]);
    let fp = u64::from_le_bytes(fp_bytes);
    let schema = resolver
        .get(fp)
        .ok_or_else(|| DecodeError::UnknownFingerprint(fingerprint_hex(fp)))?;
    let mut body = &bytes[10..];
    let value = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .and_then(|r| r.read_value(&mut body))
        .map_err(|e| DecodeError::Body(e.to_string()))?;
    if !body.is_empty() {
        return Err(DecodeError::TrailingBytes(body.len()));
    }
    Ok((fp, value))
}
