//! Decoding a capture record (Avro envelope) into typed rows the processor can map and route.
//!
//! The processor reads the same bytes any external consumer reads: single-object Avro resolved
//! through the schemas topic (`event::SchemaResolver`). Field names in the Avro schema
//! are sanitized; the real column name is the field's `sb.column` attribute, so rows here are
//! keyed by real column names. Decimals are rendered exactly (text) using the schema's scale.

use std::collections::BTreeMap;

use apache_avro::Schema;
use apache_avro::schema::{RecordSchema, UnionSchema};
use apache_avro::types::Value as Avro;

use crate::event::{UNCHANGED_SYMBOL, decimal_to_string};

/// One typed column value, as the change event carried it.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    /// An unchanged TOASTed value the server did not send: keep what was written before.
    Unchanged,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Exact decimal text (`-12.34`), also unconstrained numerics (`NaN` possible).
    Decimal(String),
    Text(String),
    Bytes(Vec<u8>),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since midnight.
    Time(i64),
    /// Microseconds since the epoch, no time zone (`timestamp`).
    LocalTimestamp(i64),
    /// Microseconds since the epoch, UTC (`timestamptz`).
    Timestamp(i64),
    Array(Vec<Cell>),
}

/// A `real` as the float the processor works with: its shortest decimal, not the binary
/// widening (0.1f32 is 0.1, not 0.10000000149011612), so it reads back from a list as the same
/// float4. Every path that turns a `real` into a number goes through here: a float4 can have two
/// shortest decimals (PostgreSQL prints 139276608f32 as 1.3927661e+08, Rust as 139276600), and
/// two paths picking differently would see a change where there is none.
pub fn float4_value(f: f32) -> f64 {
    f.to_string().parse().unwrap_or(f64::from(f))
}

impl Cell {
    /// The text form used in keys and for text-typed fields.
    pub fn to_text(&self) -> Option<String> {
        Some(match self {
            Cell::Null | Cell::Unchanged => return None,
            Cell::Bool(b) => b.to_string(),
            Cell::Int(i) => i.to_string(),
            Cell::Float(f) => f.to_string(),
            Cell::Decimal(s) | Cell::Text(s) => s.clone(),
            Cell::Bytes(b) => format!("\\x{}", hex::encode(b)),
            Cell::Date(d) => date_text(*d)?,
            Cell::Time(t) => {
                let secs = t.div_euclid(1_000_000);
                let micros = t.rem_euclid(1_000_000);
                let base = format!(
                    "{:02}:{:02}:{:02}",
                    secs / 3600,
                    (secs / 60) % 60,
                    secs % 60
                );
                if micros == 0 {
                    base
                } else {
                    format!("{base}.{micros:06}")
                }
            }
            Cell::LocalTimestamp(us) => timestamp_text(*us, false)?,
            Cell::Timestamp(us) => timestamp_text(*us, true)?,
            Cell::Array(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|c| c.to_text().unwrap_or_else(|| "NULL".into()))
                    .collect();
                format!("{{{}}}", parts.join(","))
            }
        })
    }
}

fn date_text(days: i32) -> Option<String> {
    let d = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?
        .checked_add_signed(chrono::TimeDelta::days(i64::from(days)))?;
    Some(d.format("%Y-%m-%d").to_string())
}

fn timestamp_text(us: i64, utc: bool) -> Option<String> {
    let t = chrono::DateTime::from_timestamp_micros(us)?;
    let fmt = if us.rem_euclid(1_000_000) == 0 {
        "%Y-%m-%dT%H:%M:%S"
    } else {
        "%Y-%m-%dT%H:%M:%S%.6f"
    };
    let mut s = t.format(fmt).to_string();
    if utc {
        s.push('Z');
    }
    Some(s)
}

/// Column name → value, for the columns the image carries.
pub type Row = BTreeMap<String, Cell>;

/// The decoded change event, as much as the processor needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Debezium op code: `c`, `u`, `d`, `r`, `t`.
    pub op: char,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// `schema.table`.
    pub table: String,
    /// Commit LSN.
    pub lsn: u64,
    /// Commit time, ms since the epoch.
    pub commit_ts_ms: i64,
    /// Replication origin of the transaction (our own return-path writes carry one).
    pub origin: Option<String>,
}

/// Why a record could not be turned into a [`Change`]. Never retryable: the bytes stay wrong.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("cannot read the change event: {0}")]
pub struct RowError(pub String);

/// Decodes a value decoded by `event::decode` with its writer schema.
pub fn change_from_avro(schema: &Schema, value: &Avro) -> Result<Change, RowError> {
    let Schema::Record(envelope) = schema else {
        return Err(RowError("the envelope schema is not a record".into()));
    };
    let Avro::Record(fields) = value else {
        return Err(RowError("the envelope value is not a record".into()));
    };
    // `after` refers to the `Value` record defined inline in `before`.
    let value_schema = field_schema(envelope, "before")
        .and_then(record_in_union)
        .ok_or_else(|| RowError("the envelope has no Value record".into()))?;
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let op = match get("op") {
        Some(Avro::String(s)) if s.len() == 1 => s.chars().next().unwrap_or('?'),
        other => return Err(RowError(format!("unexpected op {other:?}"))),
    };
    let before = image(value_schema, get("before"))?;
    let after = image(value_schema, get("after"))?;
    let Some(Avro::Record(source)) = get("source") else {
        return Err(RowError("the envelope has no source record".into()));
    };
    let sget = |name: &str| source.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let text = |name: &str| match sget(name) {
        Some(Avro::String(s)) => s.clone(),
        _ => String::new(),
    };
    let lsn = match sget("lsn").map(unwrap_union) {
        Some(Avro::Long(l)) => *l as u64,
        _ => 0,
    };
    let commit_ts_ms = match sget("ts_ms").map(unwrap_union) {
        Some(Avro::Long(l)) => *l,
        _ => 0,
    };
    let origin = match sget("origin").map(unwrap_union) {
        Some(Avro::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(Change {
        op,
        before,
        after,
        table: format!("{}.{}", text("schema"), text("table")),
        lsn,
        commit_ts_ms,
        origin,
    })
}

/// One column of a change event's row image, as its writer schema describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnShape {
    /// The real column name (`sb.column`).
    pub column: String,
    /// The PostgreSQL type as `format_type` prints it (`sb.pgType`), when the schema says.
    pub pg_type: Option<String>,
    /// The Avro type of its values (the non-null branch of a nullable union).
    pub avro: Schema,
}

/// The columns of the row images of an envelope schema, in schema order.
pub fn value_columns(envelope: &Schema) -> Result<Vec<ColumnShape>, RowError> {
    let Schema::Record(envelope) = envelope else {
        return Err(RowError("the envelope schema is not a record".into()));
    };
    let value = field_schema(envelope, "before")
        .and_then(record_in_union)
        .ok_or_else(|| RowError("the envelope has no Value record".into()))?;
    Ok(value
        .fields
        .iter()
        .map(|f| {
            let attr = |name: &str| match f.custom_attributes.get(name) {
                Some(serde_json::Value::String(c)) => Some(c.clone()),
                _ => None,
            };
            let avro = match &f.schema {
                Schema::Union(u) => u
                    .variants()
                    .iter()
                    .find(|v| !matches!(v, Schema::Null | Schema::Enum(_)))
                    .cloned()
                    .unwrap_or(Schema::Null),
                other => other.clone(),
            };
            ColumnShape {
                column: attr("sb.column").unwrap_or_else(|| f.name.clone()),
                pg_type: attr("sb.pgType"),
                avro,
            }
        })
        .collect())
}

/// Decodes a capture record key (the `Key` record) into its columns, in key order.
pub fn key_from_avro(schema: &Schema, value: &Avro) -> Result<Vec<(String, Cell)>, RowError> {
    let (Schema::Record(rs), Avro::Record(fields)) = (schema, value) else {
        return Err(RowError("the key is not a record".into()));
    };
    let mut out = Vec::with_capacity(fields.len());
    for (name, v) in fields {
        let Some(f) = rs.fields.iter().find(|f| &f.name == name) else {
            continue;
        };
        let column = match f.custom_attributes.get("sb.column") {
            Some(serde_json::Value::String(c)) => c.clone(),
            _ => name.clone(),
        };
        out.push((column, cell(&f.schema, v)?));
    }
    Ok(out)
}

fn field_schema<'a>(record: &'a RecordSchema, name: &str) -> Option<&'a Schema> {
    record
        .fields
        .iter()
        .find(|f| f.name == name)
        .map(|f| &f.schema)
}

fn record_in_union(schema: &Schema) -> Option<&RecordSchema> {
    match schema {
        Schema::Union(u) => u.variants().iter().find_map(|v| match v {
            Schema::Record(r) => Some(r),
            _ => None,
        }),
        Schema::Record(r) => Some(r),
        _ => None,
    }
}

fn unwrap_union(v: &Avro) -> &Avro {
    match v {
        Avro::Union(_, inner) => inner,
        other => other,
    }
}

fn image(schema: &RecordSchema, value: Option<&Avro>) -> Result<Option<Row>, RowError> {
    let Some(value) = value.map(unwrap_union) else {
        return Ok(None);
    };
    let fields = match value {
        Avro::Null => return Ok(None),
        Avro::Record(fields) => fields,
        other => return Err(RowError(format!("row image is not a record: {other:?}"))),
    };
    let mut row = Row::new();
    for (name, v) in fields {
        let Some(f) = schema.fields.iter().find(|f| &f.name == name) else {
            continue;
        };
        let column = match f.custom_attributes.get("sb.column") {
            Some(serde_json::Value::String(c)) => c.clone(),
            _ => name.clone(),
        };
        row.insert(column, cell(&f.schema, v)?);
    }
    Ok(Some(row))
}

/// The branch schema of a union value (`None` for non-unions).
fn branch<'a>(schema: &'a Schema, value: &Avro) -> &'a Schema {
    match (schema, value) {
        (Schema::Union(u), Avro::Union(i, _)) => variant(u, *i).unwrap_or(schema),
        _ => schema,
    }
}

fn variant(u: &UnionSchema, i: u32) -> Option<&Schema> {
    u.variants().get(i as usize)
}

fn cell(schema: &Schema, value: &Avro) -> Result<Cell, RowError> {
    let schema = branch(schema, value);
    let value = unwrap_union(value);
    Ok(match value {
        Avro::Null => Cell::Null,
        Avro::Enum(_, s) if s == UNCHANGED_SYMBOL => Cell::Unchanged,
        Avro::Enum(_, s) | Avro::String(s) => Cell::Text(s.clone()),
        Avro::Boolean(b) => Cell::Bool(*b),
        Avro::Int(i) => Cell::Int(i64::from(*i)),
        Avro::Long(l) => Cell::Int(*l),
        Avro::Float(f) => Cell::Float(float4_value(*f)),
        Avro::Double(f) => Cell::Float(*f),
        Avro::Bytes(b) | Avro::Fixed(_, b) => Cell::Bytes(b.clone()),
        Avro::Decimal(d) => {
            let scale = match schema {
                Schema::Decimal(ds) => ds.scale,
                _ => 0,
            };
            let bytes: Vec<u8> = d
                .try_into()
                .map_err(|e| RowError(format!("bad decimal: {e}")))?;
            Cell::Decimal(decimal_to_string(&bytes, scale))
        }
        Avro::Date(d) => Cell::Date(*d),
        Avro::TimeMicros(t) => Cell::Time(*t),
        Avro::TimeMillis(t) => Cell::Time(i64::from(*t) * 1000),
        Avro::TimestampMicros(t) => Cell::Timestamp(*t),
        Avro::TimestampMillis(t) => Cell::Timestamp(t.saturating_mul(1000)),
        Avro::LocalTimestampMicros(t) => Cell::LocalTimestamp(*t),
        Avro::LocalTimestampMillis(t) => Cell::LocalTimestamp(t.saturating_mul(1000)),
        Avro::Uuid(u) => Cell::Text(u.to_string()),
        Avro::Array(items) => {
            let item_schema = match schema {
                Schema::Array(a) => &*a.items,
                other => other,
            };
            Cell::Array(
                items
                    .iter()
                    .map(|i| cell(item_schema, i))
                    .collect::<Result<_, _>>()?,
            )
        }
        other => return Err(RowError(format!("unsupported Avro value {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms() {
        assert_eq!(Cell::Date(0).to_text().unwrap(), "1970-01-01");
        assert_eq!(Cell::Date(-1).to_text().unwrap(), "1969-12-31");
        assert_eq!(
            Cell::Timestamp(1_500_000).to_text().unwrap(),
            "1970-01-01T00:00:01.500000Z"
        );
        assert_eq!(
            Cell::LocalTimestamp(0).to_text().unwrap(),
            "1970-01-01T00:00:00"
        );
        assert_eq!(
            Cell::Time(3_661_000_001).to_text().unwrap(),
            "01:01:01.000001"
        );
        assert_eq!(
            Cell::Array(vec![Cell::Int(1), Cell::Null])
                .to_text()
                .unwrap(),
            "{1,NULL}"
        );
        assert_eq!(Cell::Unchanged.to_text(), None);
    }

    #[test]
    fn a_real_is_its_shortest_decimal() {
        let s = Schema::Float;
        assert_eq!(cell(&s, &Avro::Float(0.1)).unwrap(), Cell::Float(0.1));
        assert_eq!(
            cell(&s, &Avro::Float(-4.273125)).unwrap(),
            Cell::Float(-4.273125)
        );
    }

    #[test]
    fn a_float4_with_two_shortest_decimals_is_one_value() {
        // PostgreSQL prints this float4 as 1.3927661e+08; Rust's shortest is 139276600 (the tie
        // rounds to the same float4). Read back from the database, it must equal the captured one.
        let captured = 139_276_608f32;
        let printed_by_postgres: f64 = "1.3927661e+08".parse().unwrap();
        assert_ne!(printed_by_postgres, float4_value(captured));
        assert_eq!(
            float4_value(printed_by_postgres as f32),
            float4_value(captured)
        );
    }
}
