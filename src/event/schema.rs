//! Avro schemas for change events: PostgreSQL type → Avro type, the per-table `Key`, `Value` and
//! `Envelope` records derived from a [`Relation`], the Parsing Canonical Form and the
//! CRC-64-AVRO fingerprint (implemented here per the Avro specification, because
//! `apache_avro`'s canonical form keeps `precision`/`scale`, which the specification strips, so its
//! fingerprints would differ from Java's for decimal columns).
//!
//! See `schemas/README.md` for the rules written down for consumers.

use std::collections::HashSet;

use serde_json::{Map, Value as Json, json};

use super::convert::Scalar;
use crate::event::change::{Column, Relation, TypeKind};

/// Name of the shared marker enum for unchanged TOASTed values.
pub const UNCHANGED_NAME: &str = "sb.Unchanged";
/// Its only symbol.
pub const UNCHANGED_SYMBOL: &str = "UNCHANGED_TOAST";
/// Name of the shared Debezium-style `source` record.
pub const SOURCE_NAME: &str = "sb.Source";

// Built-in type oids (pg_type.dat); stable across PostgreSQL versions.
const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const CHAR: u32 = 18;
const NAME: u32 = 19;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const DATE: u32 = 1082;
const TIME: u32 = 1083;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const INTERVAL: u32 = 1186;
const TIMETZ: u32 = 1266;
const NUMERIC: u32 = 1700;
const UUID: u32 = 2950;
const JSONB: u32 = 3802;

/// Avro (precision, scale) for a numeric typmod, or `None` when unconstrained (typmod -1).
/// PostgreSQL 15+ allows a negative scale (`numeric(2,-3)`, integers rounded to thousands) and a
/// scale above the precision (`numeric(2,5)`); Avro needs 0 ≤ scale ≤ precision, so the Avro
/// decimal is widened to hold every value of the column exactly.
pub(crate) fn numeric_avro(typmod: i32) -> Option<(u32, u32)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4;
    let precision = ((t >> 16) & 0xffff) as u32;
    // The scale is an 11-bit signed field in PostgreSQL 15+ (it was 0..=precision before).
    let raw_scale = t & 0x7ff;
    let scale = if raw_scale & 0x400 != 0 {
        raw_scale - 0x800
    } else {
        raw_scale
    };
    if precision == 0 {
        return None;
    }
    let avro_scale = scale.max(0) as u32;
    let avro_precision = (precision + (-scale).max(0) as u32).max(avro_scale);
    Some((avro_precision, avro_scale))
}

/// How a column is written: a scalar, or a one-dimensional array of nullable scalars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shape {
    Scalar(Scalar),
    Array(Scalar),
}

/// The scalar mapping of a built-in type oid; `None` = not mapped (text form + warning).
fn scalar_for_oid(oid: u32, typmod: i32) -> Option<Scalar> {
    Some(match oid {
        BOOL => Scalar::Bool,
        INT2 | INT4 => Scalar::Int,
        INT8 => Scalar::Long,
        FLOAT4 => Scalar::Float,
        FLOAT8 => Scalar::Double,
        NUMERIC => match numeric_avro(typmod) {
            Some((precision, scale)) => Scalar::Decimal { precision, scale },
            None => Scalar::String,
        },
        TEXT | VARCHAR | BPCHAR | NAME | CHAR => Scalar::String,
        JSON | JSONB => Scalar::Json,
        UUID => Scalar::Uuid,
        BYTEA => Scalar::Bytes,
        DATE => Scalar::Date,
        TIME => Scalar::Time,
        TIMESTAMP => Scalar::Timestamp,
        TIMESTAMPTZ => Scalar::TimestampTz,
        _ => return None,
    })
}

/// Fixed-length built-in types are never TOASTed, so their fields get no `sb.Unchanged` branch.
fn is_fixed_length(oid: u32) -> bool {
    matches!(
        oid,
        BOOL | CHAR
            | NAME
            | INT8
            | INT2
            | INT4
            | OID
            | FLOAT4
            | FLOAT8
            | DATE
            | TIME
            | TIMESTAMP
            | TIMESTAMPTZ
            | INTERVAL
            | TIMETZ
            | UUID
    )
}

/// The column's shape, whether it can be TOASTed, and whether it is unmapped (warned about).
pub(crate) fn column_shape(col: &Column) -> (Shape, bool, bool) {
    match &col.kind {
        TypeKind::Base => match scalar_for_oid(col.type_oid, col.type_modifier) {
            Some(s) => (Shape::Scalar(s), !is_fixed_length(col.type_oid), false),
            None => (
                Shape::Scalar(Scalar::String),
                !is_fixed_length(col.type_oid),
                true,
            ),
        },
        // Enums are 4-byte oids on disk: never TOASTed.
        TypeKind::Enum => (Shape::Scalar(Scalar::String), false, false),
        TypeKind::Domain { base_oid } => {
            // A domain column's typmod is the column's own; the domain's is not in the relation,
            // so a constrained numeric domain falls back to the exact string form.
            let typmod = if *base_oid == col.type_oid {
                col.type_modifier
            } else {
                -1
            };
            match scalar_for_oid(*base_oid, typmod) {
                Some(s) => (Shape::Scalar(s), !is_fixed_length(*base_oid), false),
                None => (
                    Shape::Scalar(Scalar::String),
                    !is_fixed_length(*base_oid),
                    true,
                ),
            }
        }
        TypeKind::Array {
            element_oid,
            element,
        } => {
            // Arrays are varlena: always TOASTable. The column typmod applies to the elements.
            let elem = match element.as_ref() {
                TypeKind::Base => scalar_for_oid(*element_oid, col.type_modifier),
                TypeKind::Enum => Some(Scalar::String),
                TypeKind::Domain { base_oid } => scalar_for_oid(*base_oid, -1),
                TypeKind::Array { .. } | TypeKind::Other => None,
            };
            match elem {
                Some(s) => (Shape::Array(s), true, false),
                None => (Shape::Array(Scalar::String), true, true),
            }
        }
        TypeKind::Other => (Shape::Scalar(Scalar::String), true, true),
    }
}

fn scalar_json(s: &Scalar) -> Json {
    match s {
        Scalar::Bool => json!("boolean"),
        Scalar::Int => json!("int"),
        Scalar::Long => json!("long"),
        Scalar::Float => json!("float"),
        Scalar::Double => json!("double"),
        Scalar::Decimal { precision, scale } => {
            json!({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale})
        }
        Scalar::String => json!("string"),
        Scalar::Json => json!({"type": "string", "connect.name": "io.debezium.data.Json"}),
        Scalar::Uuid => json!({"type": "string", "logicalType": "uuid"}),
        Scalar::Bytes => json!("bytes"),
        Scalar::Date => json!({"type": "int", "logicalType": "date"}),
        Scalar::Time => json!({"type": "long", "logicalType": "time-micros"}),
        Scalar::Timestamp => json!({"type": "long", "logicalType": "local-timestamp-micros"}),
        Scalar::TimestampTz => json!({"type": "long", "logicalType": "timestamp-micros"}),
    }
}

/// Whether a value of this shape may need the `string` fallback branch.
pub(crate) fn shape_has_special(shape: &Shape) -> bool {
    match shape {
        Shape::Scalar(s) => s.has_special(),
        // Multi-dimensional arrays and arrays with bounds decoration fall back to text.
        Shape::Array(_) => true,
    }
}

fn shape_json(shape: &Shape) -> Json {
    match shape {
        Shape::Scalar(s) => scalar_json(s),
        Shape::Array(s) => json!({"type": "array", "items": ["null", scalar_json(s)]}),
    }
}

/// Union branch indexes of one field (`None` = branch absent); `union == false` means the field's
/// type is the bare main type (no index written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Branches {
    pub union: bool,
    pub null: Option<i64>,
    pub main: i64,
    pub string: Option<i64>,
    pub unchanged: Option<i64>,
}

impl Branches {
    fn new(nullable: bool, string: bool, unchanged: bool) -> Self {
        let mut next = 0;
        let mut take = |present: bool| {
            present.then(|| {
                next += 1;
                next - 1
            })
        };
        let null = take(nullable);
        let main = take(true).unwrap_or(0);
        let string = take(string);
        let unchanged = take(unchanged);
        Branches {
            union: next > 1,
            null,
            main,
            string,
            unchanged,
        }
    }
}

/// Avro name part: `[A-Za-z_][A-Za-z0-9_]*`; every other character becomes `_`.
pub fn sanitize_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The namespace of a table's records: `sb.<pipeline>.<schema>.<table>`, each part sanitized.
pub fn table_namespace(pipeline: &str, schema: &str, table: &str) -> String {
    format!(
        "sb.{}.{}.{}",
        sanitize_name(pipeline),
        sanitize_name(schema),
        sanitize_name(table)
    )
}

/// The `sb.Source` record (Debezium's `source` block). Committed as `schemas/sb.Source.avsc`.
pub fn source_schema_json() -> Json {
    json!({
        "type": "record",
        "name": "Source",
        "namespace": "sb",
        "doc": "Where and when the change happened (Debezium-compatible source block).",
        "fields": [
            {"name": "version", "type": "string", "doc": "SyncBridge version"},
            {"name": "connector", "type": "string", "doc": "\"syncbridge\" (WAL), or \"syncbridge.query.full\" / \".timestamp\" / \".incrementing\" (query sources)"},
            {"name": "name", "type": "string", "doc": "pipeline name (Debezium's logical server name)"},
            {"name": "ts_ms", "type": "long", "doc": "commit time, ms since the epoch"},
            {"name": "snapshot", "type": "string", "doc": "\"true\" for op=r snapshot rows, else \"false\""},
            {"name": "db", "type": "string"},
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            {"name": "txId", "type": ["null", "long"], "default": null},
            {"name": "lsn", "type": ["null", "long"], "default": null, "doc": "commit LSN (u64 bits as a long)"},
            {"name": "origin", "type": ["null", "string"], "default": null, "doc": "replication origin, if any"}
        ]
    })
}

/// The `sb.Unchanged` marker enum. Committed as `schemas/sb.Unchanged.avsc`.
pub fn unchanged_schema_json() -> Json {
    json!({
        "type": "enum",
        "name": "Unchanged",
        "namespace": "sb",
        "doc": "An unchanged TOASTed value the server did not send (not NULL: the value is unknown here and unchanged).",
        "symbols": [UNCHANGED_SYMBOL]
    })
}

/// One planned field of a Value or Key record.
#[derive(Debug, Clone)]
pub(crate) struct FieldPlan {
    /// Index of the column in `Relation::columns`.
    pub column: usize,
    pub shape: Shape,
    pub branches: Branches,
    /// For the once-per-column warning about unmapped types.
    pub unmapped: bool,
}

/// Unique sanitized Avro field names for the relation's columns (collisions get `_2`, `_3`...).
fn field_names(rel: &Relation) -> Vec<String> {
    let mut used = HashSet::new();
    rel.columns
        .iter()
        .map(|c| {
            let base = sanitize_name(&c.name);
            let mut name = base.clone();
            let mut n = 2;
            while !used.insert(name.clone()) {
                name = format!("{base}_{n}");
                n += 1;
            }
            name
        })
        .collect()
}

/// The schemas and write plans of one relation version.
#[derive(Debug)]
pub(crate) struct TableSchemas {
    pub value_fields: Vec<FieldPlan>,
    pub key_fields: Vec<FieldPlan>,
    pub envelope: Json,
    /// `None` when the relation has no key columns (events then have an empty key).
    pub key: Option<Json>,
}

/// Builds the Envelope (with Value and Source inline) and Key schemas of a relation version.
/// `value_suffix` renames the Value/Key records when a fingerprint would otherwise collide with
/// an earlier, differently typed version (see `Encoder`).
pub(crate) fn table_schemas(
    pipeline: &str,
    rel: &Relation,
    value_suffix: Option<&str>,
) -> TableSchemas {
    let ns = table_namespace(pipeline, &rel.schema, &rel.name);
    let names = field_names(rel);
    let sfx = value_suffix.map(|s| format!("_{s}")).unwrap_or_default();
    let value_name = format!("{ns}.Value{sfx}");
    let mut unchanged_defined = false;
    let mut value_fields = Vec::with_capacity(rel.columns.len());
    let mut value_json = Vec::with_capacity(rel.columns.len());
    for (i, col) in rel.columns.iter().enumerate() {
        let (shape, toastable, unmapped) = column_shape(col);
        // Every value field is nullable: `before` under REPLICA IDENTITY DEFAULT carries only
        // key columns, and a null default keeps ADD/DROP COLUMN versions mutually resolvable.
        let branches = Branches::new(true, shape_has_special(&shape), toastable);
        let mut types = vec![json!("null"), shape_json(&shape)];
        if branches.string.is_some() {
            types.push(json!("string"));
        }
        if branches.unchanged.is_some() {
            if unchanged_defined {
                types.push(json!(UNCHANGED_NAME));
            } else {
                types.push(unchanged_schema_json());
                unchanged_defined = true;
            }
        }
        value_json.push(field_json(&names[i], col, Json::Array(types), true));
        value_fields.push(FieldPlan {
            column: i,
            shape,
            branches,
            unmapped,
        });
    }
    let value_record = json!({
        "type": "record",
        "name": format!("Value{sfx}"),
        "namespace": ns,
        "fields": value_json,
    });
    let envelope = json!({
        "type": "record",
        "name": "Envelope",
        "namespace": ns,
        "doc": format!("Change events of {}.{} (Debezium-compatible envelope)", rel.schema, rel.name),
        "fields": [
            {"name": "before", "type": ["null", value_record], "default": null},
            {"name": "after", "type": ["null", value_name], "default": null},
            {"name": "source", "type": source_schema_json()},
            {"name": "op", "type": "string", "doc": "c, u, d, r or t"},
            {"name": "ts_ms", "type": ["null", "long"], "default": null}
        ]
    });

    let mut key_fields = Vec::new();
    let mut key_json = Vec::new();
    for (i, col) in rel.columns.iter().enumerate().filter(|(_, c)| c.is_key) {
        let (shape, _, unmapped) = column_shape(col);
        let branches = Branches::new(col.nullable, shape_has_special(&shape), false);
        let mut types = Vec::new();
        if branches.null.is_some() {
            types.push(json!("null"));
        }
        types.push(shape_json(&shape));
        if branches.string.is_some() {
            types.push(json!("string"));
        }
        let ty = if branches.union {
            Json::Array(types)
        } else {
            types.remove(0)
        };
        key_json.push(field_json(&names[i], col, ty, false));
        key_fields.push(FieldPlan {
            column: i,
            shape,
            branches,
            unmapped,
        });
    }
    let key = (!key_fields.is_empty()).then(|| {
        json!({
            "type": "record",
            "name": format!("Key{sfx}"),
            "namespace": ns,
            "fields": key_json,
        })
    });
    TableSchemas {
        value_fields,
        key_fields,
        envelope,
        key,
    }
}

fn field_json(name: &str, col: &Column, ty: Json, null_default: bool) -> Json {
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    m.insert("type".into(), ty);
    if null_default {
        m.insert("default".into(), Json::Null);
    }
    // Not part of the canonical form: lets consumers map back to the PostgreSQL column.
    m.insert("sb.column".into(), json!(col.name));
    m.insert("sb.pgType".into(), json!(col.type_name));
    Json::Object(m)
}

// ---------------------------------------------------------------- canonical form + fingerprint

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Parsing Canonical Form (Avro specification) of a schema given as JSON. With `extended`, the
/// attributes the specification strips but that change decoding (`logicalType`, `precision`,
/// `scale`) are kept: used only to detect fingerprint collisions between different schemas.
pub fn canonical_form(schema: &Json, extended: bool) -> Result<String, String> {
    let mut out = String::new();
    pcf(schema, None, &mut HashSet::new(), extended, &mut out)?;
    Ok(out)
}

fn quote(s: &str) -> String {
    // serde_json escapes exactly what JSON needs; names and symbols are ASCII anyway.
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

fn fullname(name: &str, ns: Option<&str>) -> String {
    match ns {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

fn pcf(
    v: &Json,
    ns: Option<&str>,
    defined: &mut HashSet<String>,
    extended: bool,
    out: &mut String,
) -> Result<(), String> {
    match v {
        Json::String(s) => {
            if PRIMITIVES.contains(&s.as_str()) {
                out.push_str(&quote(s));
            } else {
                out.push_str(&quote(&fullname(s, ns)));
            }
            Ok(())
        }
        Json::Array(items) => {
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                pcf(it, ns, defined, extended, out)?;
            }
            out.push(']');
            Ok(())
        }
        Json::Object(m) => {
            let ty = match m.get("type") {
                Some(Json::String(t)) => t.as_str(),
                Some(other) => return pcf(other, ns, defined, extended, out),
                None => return Err("schema object without type".into()),
            };
            match ty {
                "record" | "error" | "enum" | "fixed" => {
                    let name = m
                        .get("name")
                        .and_then(Json::as_str)
                        .ok_or("named type without name")?;
                    let own_ns = m.get("namespace").and_then(Json::as_str).or(ns);
                    let full = fullname(name, own_ns);
                    if !defined.insert(full.clone()) {
                        out.push_str(&quote(&full));
                        return Ok(());
                    }
                    // Names inside resolve against the namespace of the enclosing named type.
                    let inner_ns = full.rsplit_once('.').map(|(n, _)| n.to_string());
                    out.push_str(&format!(
                        "{{\"name\":{},\"type\":{}",
                        quote(&full),
                        quote(ty)
                    ));
                    match ty {
                        "enum" => {
                            let syms = m
                                .get("symbols")
                                .and_then(Json::as_array)
                                .ok_or("enum without symbols")?;
                            out.push_str(",\"symbols\":[");
                            for (i, s) in syms.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                out.push_str(&quote(s.as_str().ok_or("bad enum symbol")?));
                            }
                            out.push(']');
                        }
                        "fixed" => {
                            let size = m
                                .get("size")
                                .and_then(Json::as_u64)
                                .ok_or("fixed without size")?;
                            out.push_str(&format!(",\"size\":{size}"));
                        }
                        _ => {
                            let fields = m
                                .get("fields")
                                .and_then(Json::as_array)
                                .ok_or("record without fields")?;
                            out.push_str(",\"fields\":[");
                            for (i, f) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let fname = f
                                    .get("name")
                                    .and_then(Json::as_str)
                                    .ok_or("field without name")?;
                                let fty = f.get("type").ok_or("field without type")?;
                                out.push_str(&format!("{{\"name\":{},\"type\":", quote(fname)));
                                pcf(fty, inner_ns.as_deref(), defined, extended, out)?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    if extended {
                        push_logical(m, out);
                    }
                    out.push('}');
                    Ok(())
                }
                "array" => {
                    out.push_str("{\"type\":\"array\",\"items\":");
                    pcf(
                        m.get("items").ok_or("array without items")?,
                        ns,
                        defined,
                        extended,
                        out,
                    )?;
                    out.push('}');
                    Ok(())
                }
                "map" => {
                    out.push_str("{\"type\":\"map\",\"values\":");
                    pcf(
                        m.get("values").ok_or("map without values")?,
                        ns,
                        defined,
                        extended,
                        out,
                    )?;
                    out.push('}');
                    Ok(())
                }
                prim if PRIMITIVES.contains(&prim) => {
                    if extended && m.contains_key("logicalType") {
                        out.push_str(&format!("{{\"type\":{}", quote(prim)));
                        push_logical(m, out);
                        out.push('}');
                    } else {
                        out.push_str(&quote(prim));
                    }
                    Ok(())
                }
                // `{"type": "sb.Unchanged"}`: a reference written as an object.
                other => pcf(&Json::String(other.to_string()), ns, defined, extended, out),
            }
        }
        _ => Err("schema must be a string, array or object".into()),
    }
}

fn push_logical(m: &Map<String, Json>, out: &mut String) {
    for k in ["logicalType", "precision", "scale"] {
        if let Some(v) = m.get(k) {
            out.push_str(&format!(",{}:{}", quote(k), v));
        }
    }
}

/// CRC-64-AVRO (Rabin) fingerprint of a canonical form, as in the Avro specification.
pub fn fingerprint64(canonical: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    const TABLE: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut fp = i as u64;
            let mut j = 0;
            while j < 8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
                j += 1;
            }
            t[i] = fp;
            i += 1;
        }
        t
    };
    let mut fp = EMPTY;
    for &b in canonical {
        fp = (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

/// The schemas-topic key of a fingerprint: lowercase hex of the 8 header bytes (little-endian),
/// i.e. exactly `hex(bytes[2..10])` of a single-object encoded message.
pub fn fingerprint_hex(fp: u64) -> String {
    hex::encode(fp.to_le_bytes())
}

/// Parses [`fingerprint_hex`] output.
pub fn parse_fingerprint_hex(s: &str) -> Option<u64> {
    let b: [u8; 8] = hex::decode(s).ok()?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_matches_spec_and_apache_avro() {
        // Avro's own test vector: fingerprint64("null") == 7195948357588979594.
        assert_eq!(fingerprint64(b"\"null\"") as i64, 7_195_948_357_588_979_594);
        // Without decimals our canonical form must equal apache_avro's, and so the fingerprint.
        let src = source_schema_json();
        let parsed = apache_avro::Schema::parse(&src).unwrap();
        let ours = canonical_form(&src, false).unwrap();
        assert_eq!(ours, parsed.canonical_form());
        let theirs = parsed.fingerprint::<apache_avro::rabin::Rabin>();
        assert_eq!(theirs.bytes, fingerprint64(ours.as_bytes()).to_le_bytes());
    }

    #[test]
    fn canonical_form_strips_and_qualifies() {
        let s = json!({"type": "record", "name": "R", "namespace": "a.b", "doc": "x", "fields": [
            {"name": "f", "type": {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2}, "default": "x"},
            {"name": "g", "type": ["null", {"type": "enum", "name": "E", "symbols": ["A"]}]},
            {"name": "h", "type": "E"},
            {"name": "i", "type": {"type": "array", "items": "int"}}
        ]});
        assert_eq!(
            canonical_form(&s, false).unwrap(),
            r#"{"name":"a.b.R","type":"record","fields":[{"name":"f","type":"bytes"},{"name":"g","type":["null",{"name":"a.b.E","type":"enum","symbols":["A"]}]},{"name":"h","type":"a.b.E"},{"name":"i","type":{"type":"array","items":"int"}}]}"#
        );
        assert!(
            canonical_form(&s, true)
                .unwrap()
                .contains(r#"{"type":"bytes","logicalType":"decimal","precision":4,"scale":2}"#)
        );
        assert!(canonical_form(&json!(3), false).is_err());
        assert!(canonical_form(&json!({"name": "x"}), false).is_err());
    }

    #[test]
    fn numeric_typmods() {
        let tm = |p: i32, s: i32| ((p << 16) | (s & 0x7ff)) + 4;
        assert_eq!(numeric_avro(-1), None);
        assert_eq!(numeric_avro(tm(12, 2)), Some((12, 2)));
        assert_eq!(numeric_avro(tm(5, 0)), Some((5, 0)));
        assert_eq!(numeric_avro(tm(2, -3)), Some((5, 0)));
        assert_eq!(numeric_avro(tm(2, 5)), Some((5, 5)));
        assert_eq!(numeric_avro(tm(1000, 1000)), Some((1000, 1000)));
    }

    #[test]
    fn names_are_valid_avro() {
        assert_eq!(sanitize_name("order-items"), "order_items");
        assert_eq!(sanitize_name("1st"), "_1st");
        assert_eq!(sanitize_name(""), "_");
        assert_eq!(sanitize_name("Größe"), "Gr__e");
        assert_eq!(table_namespace("p-1", "public", "a b"), "sb.p_1.public.a_b");
    }

    #[test]
    fn branch_indexes() {
        assert_eq!(
            Branches::new(true, true, true),
            Branches {
                union: true,
                null: Some(0),
                main: 1,
                string: Some(2),
                unchanged: Some(3)
            }
        );
        assert_eq!(
            Branches::new(true, false, true),
            Branches {
                union: true,
                null: Some(0),
                main: 1,
                string: None,
                unchanged: Some(2)
            }
        );
        assert_eq!(
            Branches::new(false, false, false),
            Branches {
                union: false,
                null: None,
                main: 0,
                string: None,
                unchanged: None
            }
        );
        assert_eq!(
            Branches::new(false, true, false),
            Branches {
                union: true,
                null: None,
                main: 0,
                string: Some(1),
                unchanged: None
            }
        );
    }
}
