//! Column value → SharePoint field value (graph-api.md §5.7), per the mapping's field type.
//!
//! Conversion is pure: person and lookup fields need ids that live elsewhere (the site's user
//! list, the ledger of another synced table), so the caller resolves those first and passes them
//! in [`Resolved`]. A value SharePoint cannot hold is an [`Unmappable`] that names the column,
//! the field and the reason; the row then goes to the DLQ and the pipeline continues.
//!
//! Choices made where SharePoint loses information, each so a later read-back compares equal:
//! - `datetime` is written as UTC ISO-8601 with whole seconds (SharePoint keeps whole seconds);
//!   `timestamp without time zone` values are taken as UTC.
//! - `date` is written as `YYYY-MM-DD` (Graph accepts a date string for date-only columns).
//! - `date` reads back as midnight in the site's time zone, in UTC; the nearest UTC midnight
//!   is taken as the date ([`canonical_from_item`]).
//! - numbers are JSON numbers (IEEE double); `NaN`/`Infinity` cannot be stored.
//! - `hyperlink` is written with the URL as its description; the description a person types is
//!   not part of the value (the row holds the URL), so it is kept, never written over.
//!
//! README.md's "Type mapping" table lists every conversion that loses information.

use serde_json::{Value as Json, json};

use super::row::Cell;
use crate::config::{FieldMapping, FieldType};

/// Single line of text limit (graph-api.md §4.3).
pub const MAX_TEXT_LEN: usize = 255;
/// Multiple lines of text limit (graph-api.md §10, commonly cited).
pub const MAX_NOTE_LEN: usize = 63_999;

/// Why a value cannot be written to its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column} → field {field} ({kind}): {reason}")]
pub struct Unmappable {
    pub column: String,
    pub field: String,
    pub kind: &'static str,
    pub reason: String,
}

impl Unmappable {
    fn new(m: &FieldMapping, kind: &'static str, reason: impl Into<String>) -> Self {
        Unmappable {
            column: m.column.clone(),
            field: m.field.clone(),
            kind,
            reason: reason.into(),
        }
    }
}

/// What kind of PostgreSQL type a column has, as far as [`field_holds`] cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeClass {
    /// A built-in scalar: judged by its name (`format_type`).
    Base,
    /// A domain: its base type is not known by name, so it passes (values that do not convert
    /// are dead-lettered one by one).
    Domain,
    /// Arrays, enums, composites, ranges: only fields that take any type hold them.
    Other,
}

/// The PostgreSQL types a field type takes, by family (None: any type, written as its text).
fn families(t: FieldType) -> Option<&'static [&'static str]> {
    const NUMBERS: &[&str] = &[
        "smallint",
        "integer",
        "bigint",
        "numeric",
        "real",
        "double precision",
        "money",
    ];
    const DATES: &[&str] = &["date", "timestamp"];
    Some(match t {
        FieldType::Number | FieldType::Currency => NUMBERS,
        FieldType::Date | FieldType::DateTime => DATES,
        FieldType::Boolean => &["boolean"],
        // A lookup's value is the key of the row it points to: a number or a text key.
        FieldType::Lookup => &[
            "smallint",
            "integer",
            "bigint",
            "text",
            "character varying",
            "uuid",
        ],
        _ => return None,
    })
}

/// Whether a field of type `t` can hold a column of type `type_name` (as `format_type` prints
/// it). One rule for every place that asks: the mapping editor's check, `validate --db` and the
/// processor's check of a table whose columns changed while streaming.
pub fn field_holds(t: FieldType, type_name: &str, class: TypeClass) -> bool {
    let Some(families) = families(t) else {
        return true;
    };
    match class {
        TypeClass::Domain => true,
        TypeClass::Base => families.iter().any(|f| type_name.starts_with(f)),
        TypeClass::Other => false,
    }
}

/// What a field of type `t` takes, for messages.
pub fn accepted_types(t: FieldType) -> String {
    families(t).map_or_else(
        || "any type".into(),
        |f| format!("it takes {}", f.join(", ")),
    )
}

/// What a column's values are to the converter (the [`Cell`] kinds it is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Integer,
    /// Floats and decimals.
    Fractional,
    Boolean,
    Date,
    Timestamp,
    /// Text, and every type written as its text (uuid, json, enums, intervals, …).
    Text,
    /// Kinds no typed field takes (bytes, times of day, arrays).
    Other,
    /// Not known (a domain: its base type is not known by name).
    Unknown,
}

/// Whether a field of type `t` can take values of `kind` at all: the converter's own rules
/// ([`to_fields`]). Text reaches typed fields by parsing each value (one that does not parse is
/// a dead letter), so it passes; a kind the converter refuses for every value does not. This is
/// the rule that pauses a running table and that `validate --db` reports as an error.
pub fn converts(t: FieldType, kind: ValueKind) -> bool {
    use ValueKind as K;
    if matches!(kind, K::Text | K::Unknown) {
        return true;
    }
    match t {
        FieldType::Number | FieldType::Currency => matches!(kind, K::Integer | K::Fractional),
        FieldType::Boolean => matches!(kind, K::Boolean | K::Integer),
        FieldType::Date | FieldType::DateTime => matches!(kind, K::Date | K::Timestamp),
        _ => true,
    }
}

/// The [`ValueKind`] of a column of PostgreSQL type `type_name` (as `format_type` prints it).
pub fn pg_value_kind(type_name: &str, class: TypeClass) -> ValueKind {
    use ValueKind as K;
    match class {
        TypeClass::Domain => return K::Unknown,
        TypeClass::Other if type_name.ends_with("[]") => return K::Other,
        TypeClass::Other => return K::Text,
        TypeClass::Base => {}
    }
    let starts = |names: &[&str]| names.iter().any(|n| type_name.starts_with(n));
    if starts(&["smallint", "integer", "bigint"]) {
        K::Integer
    } else if starts(&["numeric", "real", "double precision", "money"]) {
        K::Fractional
    } else if type_name == "boolean" {
        K::Boolean
    } else if type_name == "date" {
        K::Date
    } else if starts(&["timestamp"]) {
        K::Timestamp
    } else if starts(&["bytea", "time"]) {
        K::Other
    } else {
        K::Text
    }
}

/// Ids resolved by the caller for person and lookup fields (`None` = not found).
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Lookup id of the person in the site's user list.
    pub person: Option<u64>,
    /// Item id of the referenced row in the lookup list.
    pub lookup_item: Option<String>,
}

/// Graph field name(s) and JSON value(s) for one mapped column. Most fields produce one pair;
/// multi-choice adds its `@odata.type` annotation; person/lookup write `<Field>LookupId`.
pub fn to_fields(
    cell: &Cell,
    m: &FieldMapping,
    resolved: &Resolved,
) -> Result<Vec<(String, Json)>, Unmappable> {
    let one = |v: Json| Ok(vec![(m.field.clone(), v)]);
    if matches!(cell, Cell::Null) {
        return Ok(null_fields(m));
    }
    match m.field_type {
        FieldType::Text => one(non_empty(text(cell, m, MAX_TEXT_LEN)?)),
        FieldType::Note => one(non_empty(text(cell, m, MAX_NOTE_LEN)?)),
        FieldType::Number | FieldType::Currency => one(number(cell, m)?),
        FieldType::Boolean => one(json!(boolean(cell, m)?)),
        FieldType::Date => one(json!(date(cell, m)?)),
        FieldType::DateTime => one(json!(datetime(cell, m)?)),
        FieldType::Choice => {
            let v = text(cell, m, MAX_TEXT_LEN)?;
            check_choice(&v, m)?;
            one(json!(v))
        }
        FieldType::MultiChoice => Ok(multi_choice_fields(m, json!(multi_choice(cell, m)?))),
        FieldType::Person => {
            let email = text(cell, m, MAX_TEXT_LEN)?;
            match resolved.person {
                Some(id) => Ok(vec![(format!("{}LookupId", m.field), json!(id))]),
                None => Err(Unmappable::new(
                    m,
                    "unknown_user",
                    format!("no user with email {email:?} in the site"),
                )),
            }
        }
        FieldType::Lookup => match &resolved.lookup_item {
            Some(id) => {
                let id: Json = id.parse::<u64>().map_or_else(|_| json!(id), |n| json!(n));
                Ok(vec![(format!("{}LookupId", m.field), id)])
            }
            None => Err(Unmappable::new(
                m,
                "lookup_missing",
                format!(
                    "the referenced row {:?} has no item in list {:?}",
                    cell.to_text().unwrap_or_default(),
                    m.lookup_list.as_deref().unwrap_or("?")
                ),
            )),
        },
        FieldType::Hyperlink => {
            let url = text(cell, m, MAX_TEXT_LEN)?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Unmappable::new(
                    m,
                    "type_mismatch",
                    format!("{url:?} is not an http(s) URL"),
                ));
            }
            one(json!({ "Url": url, "Description": url }))
        }
    }
}

/// SharePoint keeps no empty text (an empty string reads back as no value), so `''` is written
/// as the empty value it becomes: the ledger then equals what a read returns, and a later edit
/// of another field does not take the "change" to NULL into the row.
fn non_empty(s: String) -> Json {
    if s.is_empty() { Json::Null } else { json!(s) }
}

/// The fields of a NULL cell: an empty collection for multi-choice, no lookup id for person and
/// lookup fields, else null.
fn null_fields(m: &FieldMapping) -> Vec<(String, Json)> {
    match m.field_type {
        FieldType::MultiChoice => multi_choice_fields(m, json!([])),
        FieldType::Person | FieldType::Lookup => {
            vec![(format!("{}LookupId", m.field), Json::Null)]
        }
        _ => vec![(m.field.clone(), Json::Null)],
    }
}

/// The choices of a multi-choice cell (an array, or one value), each checked against the
/// field's choices.
fn multi_choice(cell: &Cell, m: &FieldMapping) -> Result<Vec<String>, Unmappable> {
    let values = match cell {
        Cell::Array(items) => items
            .iter()
            .filter(|c| !matches!(c, Cell::Null))
            .map(|c| text(c, m, MAX_TEXT_LEN))
            .collect::<Result<Vec<_>, _>>()?,
        other => vec![text(other, m, MAX_TEXT_LEN)?],
    };
    for v in &values {
        check_choice(v, m)?;
    }
    Ok(values)
}

/// A multi-choice value with the `@odata.type` annotation Graph needs for collections.
fn multi_choice_fields(m: &FieldMapping, values: Json) -> Vec<(String, Json)> {
    vec![
        (
            format!("{}@odata.type", m.field),
            json!("Collection(Edm.String)"),
        ),
        (m.field.clone(), values),
    ]
}

/// The text that a person/lookup column holds (email or foreign key), for resolution.
pub fn reference_text(cell: &Cell) -> Option<String> {
    cell.to_text()
}

fn text(cell: &Cell, m: &FieldMapping, max: usize) -> Result<String, Unmappable> {
    let s = cell
        .to_text()
        .ok_or_else(|| Unmappable::new(m, "type_mismatch", "no value"))?;
    let n = s.chars().count();
    if n > max {
        return Err(Unmappable::new(
            m,
            "too_long",
            format!("{n} characters, the column holds at most {max}"),
        ));
    }
    Ok(s)
}

fn number(cell: &Cell, m: &FieldMapping) -> Result<Json, Unmappable> {
    // Always a double: SharePoint stores numbers as doubles and reads them back as such, so the
    // ledger's form equals what a delta read returns (echo detection compares them).
    let mismatch =
        |what: &str| Unmappable::new(m, "type_mismatch", format!("{what} is not a number"));
    let f = match cell {
        Cell::Int(i) => *i as f64,
        Cell::Float(f) => *f,
        Cell::Decimal(s) | Cell::Text(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| mismatch(&format!("{s:?}")))?,
        Cell::Bool(b) => return Err(mismatch(&b.to_string())),
        other => return Err(mismatch(&format!("{other:?}"))),
    };
    if f.is_finite() {
        Ok(json!(f))
    } else {
        Err(mismatch(&f.to_string()))
    }
}

fn boolean(cell: &Cell, m: &FieldMapping) -> Result<bool, Unmappable> {
    match cell {
        Cell::Bool(b) => Ok(*b),
        Cell::Int(0) => Ok(false),
        Cell::Int(1) => Ok(true),
        Cell::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" | "on" => Ok(true),
            "false" | "f" | "no" | "n" | "0" | "off" => Ok(false),
            _ => Err(Unmappable::new(
                m,
                "type_mismatch",
                format!("{s:?} is not a boolean"),
            )),
        },
        other => Err(Unmappable::new(
            m,
            "type_mismatch",
            format!("{other:?} is not a boolean"),
        )),
    }
}

fn date(cell: &Cell, m: &FieldMapping) -> Result<String, Unmappable> {
    let bad = |what: String| {
        Unmappable::new(
            m,
            "type_mismatch",
            format!("{what} is not a date SharePoint can store"),
        )
    };
    let days = match cell {
        Cell::Date(d) => i64::from(*d),
        Cell::Timestamp(us) | Cell::LocalTimestamp(us) => us.div_euclid(86_400_000_000),
        Cell::Text(s) => {
            return chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
                .map_err(|_| bad(format!("{s:?}")))
                .and_then(|d| in_range(d, m))
                .map(|d| d.format("%Y-%m-%d").to_string());
        }
        other => return Err(bad(format!("{other:?}"))),
    };
    let d = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|e| e.checked_add_signed(chrono::TimeDelta::days(days)))
        .ok_or_else(|| bad(days.to_string()))?;
    Ok(in_range(d, m)?.format("%Y-%m-%d").to_string())
}

/// SharePoint date columns hold 1900-01-01 ..= 8900-12-31.
fn in_range(d: chrono::NaiveDate, m: &FieldMapping) -> Result<chrono::NaiveDate, Unmappable> {
    use chrono::Datelike;
    if (1900..=8900).contains(&d.year()) {
        Ok(d)
    } else {
        Err(Unmappable::new(
            m,
            "out_of_range",
            format!("{d} is outside SharePoint's 1900..8900 date range"),
        ))
    }
}

fn datetime(cell: &Cell, m: &FieldMapping) -> Result<String, Unmappable> {
    let bad = |what: String| {
        Unmappable::new(
            m,
            "type_mismatch",
            format!("{what} is not a date-time SharePoint can store"),
        )
    };
    let t = match cell {
        Cell::Timestamp(us) | Cell::LocalTimestamp(us) => {
            chrono::DateTime::from_timestamp(us.div_euclid(1_000_000), 0)
                .ok_or_else(|| bad(us.to_string()))?
        }
        Cell::Date(d) => chrono::DateTime::from_timestamp(i64::from(*d) * 86_400, 0)
            .ok_or_else(|| bad(d.to_string()))?,
        Cell::Text(s) => chrono::DateTime::parse_from_rfc3339(s.trim())
            .map_err(|_| bad(format!("{s:?}")))?
            .with_timezone(&chrono::Utc),
        other => return Err(bad(format!("{other:?}"))),
    };
    in_range(t.date_naive(), m)?;
    Ok(t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

fn check_choice(v: &str, m: &FieldMapping) -> Result<(), Unmappable> {
    if m.choices.iter().any(|c| c == v) {
        Ok(())
    } else {
        Err(Unmappable::new(
            m,
            "unknown_choice",
            format!("{v:?} is not one of {:?}", m.choices),
        ))
    }
}

/// The item field a mapping reads: `<Field>LookupId` for persons and lookups (system fields
/// `Author`/`Editor` too), `id` for `ID`, else the field itself.
pub fn item_field_name(m: &FieldMapping) -> String {
    match (m.field.as_str(), m.field_type) {
        ("ID", _) => "id".to_string(),
        (_, FieldType::Person | FieldType::Lookup) => format!("{}LookupId", m.field),
        _ => m.field.clone(),
    }
}

/// An item's value for `m` in the canonical form the push side writes and the ledger stores
/// (same keys as [`to_fields`]), so "did the list change?" is an equality test. Absent fields
/// (SharePoint omits empty ones) are null.
pub fn canonical_from_item(
    fields: &serde_json::Map<String, Json>,
    m: &FieldMapping,
) -> Vec<(String, Json)> {
    let name = item_field_name(m);
    let raw = fields
        .get(&name)
        .or_else(|| (m.field == "ID").then(|| fields.get("ID")).flatten())
        .cloned()
        .unwrap_or(Json::Null);
    let v = match m.field_type {
        FieldType::Number | FieldType::Currency => match &raw {
            Json::Number(n) => n.as_f64().map_or(Json::Null, |f| json!(f)),
            Json::String(s) => s.parse::<f64>().map_or(raw.clone(), |f| json!(f)),
            _ => raw,
        },
        FieldType::Date => match &raw {
            Json::String(s) => json!(site_date(s)),
            _ => raw,
        },
        FieldType::DateTime => match &raw {
            Json::String(s) => chrono::DateTime::parse_from_rfc3339(s).map_or(raw.clone(), |t| {
                json!(
                    t.with_timezone(&chrono::Utc)
                        .format("%Y-%m-%dT%H:%M:%SZ")
                        .to_string()
                )
            }),
            _ => raw,
        },
        FieldType::Person | FieldType::Lookup => match &raw {
            Json::String(s) => s.parse::<u64>().map_or(raw.clone(), |n| json!(n)),
            _ => raw,
        },
        // The row holds the URL only: the value is the URL as the push writes it, so a person's
        // description is neither a change nor overwritten by a write-back.
        FieldType::Hyperlink => match raw.get("Url").and_then(Json::as_str) {
            Some(url) => json!({ "Url": url, "Description": url }),
            None => raw,
        },
        FieldType::MultiChoice => {
            let arr = match raw {
                Json::Array(a) => Json::Array(a),
                _ => json!([]),
            };
            return vec![
                (
                    format!("{}@odata.type", m.field),
                    json!("Collection(Edm.String)"),
                ),
                (m.field.clone(), arr),
            ];
        }
        _ => raw,
    };
    let key = match m.field_type {
        FieldType::Person | FieldType::Lookup => format!("{}LookupId", m.field),
        _ => m.field.clone(),
    };
    vec![(key, v)]
}

/// The date of a date-only value as SharePoint reads it back: midnight in the site's time zone,
/// in UTC (a UTC+1 site reads 2024-05-02 as `2024-05-01T23:00:00Z`, graph-api.md §5.7). The
/// nearest UTC midnight is that date for every zone within ±12 h (UTC+13/+14 sites would read
/// a day early). A bare `YYYY-MM-DD` is taken as it is.
fn site_date(s: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(s) {
        Ok(t) => (t.with_timezone(&chrono::Utc) + chrono::TimeDelta::hours(12))
            .format("%Y-%m-%d")
            .to_string(),
        Err(_) => s.get(..10).unwrap_or(s).to_string(),
    }
}

/// The column value (PostgreSQL text form; `None` = NULL) for a canonical item value of `m`.
/// `resolved` carries the email of a person id or the foreign key of a lookup id, looked up by
/// the caller. Values the column cannot take are the database's to reject (it names them).
pub fn column_text(
    canonical: &[(String, Json)],
    m: &FieldMapping,
    resolved: Option<String>,
) -> Result<Option<String>, Unmappable> {
    let v = canonical
        .iter()
        .find(|(k, _)| !k.ends_with("@odata.type"))
        .map(|(_, v)| v.clone())
        .unwrap_or(Json::Null);
    if v.is_null() {
        return Ok(None);
    }
    Ok(Some(match m.field_type {
        FieldType::Person | FieldType::Lookup => resolved.ok_or_else(|| {
            Unmappable::new(m, "unresolved", format!("no row or user for id {v}"))
        })?,
        FieldType::MultiChoice => {
            let items: Vec<String> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Json::as_str)
                        .map(pg_array_element)
                        .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", items.join(","))
        }
        FieldType::Hyperlink => v["Url"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string()),
        FieldType::Number | FieldType::Currency => match v.as_f64() {
            // Integral doubles print without a fraction so integer columns accept them.
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
            Some(f) => f.to_string(),
            None => v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string()),
        },
        _ => match v {
            Json::String(s) => s,
            other => other.to_string(),
        },
    }))
}

/// One element of a PostgreSQL array literal, quoted.
fn pg_array_element(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_takes_the_value_kinds_its_converter_can_read() {
        use ValueKind as K;
        for (t, pg, class, ok) in [
            (FieldType::Number, "integer", TypeClass::Base, true),
            (FieldType::Number, "numeric(10,2)", TypeClass::Base, true),
            (FieldType::Number, "text", TypeClass::Base, true),
            (FieldType::Number, "boolean", TypeClass::Base, false),
            (FieldType::Number, "date", TypeClass::Base, false),
            (FieldType::Number, "integer[]", TypeClass::Other, false),
            (FieldType::Number, "positive", TypeClass::Domain, true),
            (FieldType::Boolean, "date", TypeClass::Base, false),
            (
                FieldType::Date,
                "timestamp with time zone",
                TypeClass::Base,
                true,
            ),
            (
                FieldType::Date,
                "time without time zone",
                TypeClass::Base,
                false,
            ),
            (FieldType::Text, "bytea", TypeClass::Base, true),
        ] {
            assert_eq!(converts(t, pg_value_kind(pg, class)), ok, "{t} ← {pg}");
        }
        assert_eq!(pg_value_kind("mood", TypeClass::Other), K::Text);
    }
    use crate::config::Direction;

    fn m(t: FieldType) -> FieldMapping {
        FieldMapping {
            column: "c".into(),
            field: "F".into(),
            field_type: t,
            direction: Direction::Bidirectional,
            choices: vec!["a".into(), "b".into()],
            lookup_list: Some("L".into()),
            conflict: None,
        }
    }

    fn conv(c: Cell, t: FieldType) -> Result<Vec<(String, Json)>, Unmappable> {
        to_fields(&c, &m(t), &Resolved::default())
    }

    #[test]
    fn scalars() {
        assert_eq!(
            conv(Cell::Text("x".into()), FieldType::Text).unwrap(),
            vec![("F".into(), json!("x"))]
        );
        assert_eq!(
            conv(Cell::Decimal("12.50".into()), FieldType::Currency).unwrap()[0].1,
            json!(12.5)
        );
        assert_eq!(
            conv(Cell::Int(7), FieldType::Number).unwrap()[0].1,
            json!(7.0)
        );
        assert_eq!(
            conv(Cell::Date(1), FieldType::Date).unwrap()[0].1,
            json!("1970-01-02")
        );
        assert_eq!(
            conv(Cell::Timestamp(1_700_000_000_123_456), FieldType::DateTime).unwrap()[0].1,
            json!("2023-11-14T22:13:20Z")
        );
        assert_eq!(
            conv(Cell::Text("t".into()), FieldType::Boolean).unwrap()[0].1,
            json!(true)
        );
        assert_eq!(conv(Cell::Null, FieldType::Text).unwrap()[0].1, Json::Null);
        assert_eq!(
            conv(Cell::Text(String::new()), FieldType::Note).unwrap()[0].1,
            Json::Null
        );
    }

    #[test]
    fn every_bad_value_kind_is_named() {
        let long = "x".repeat(256);
        assert_eq!(
            conv(Cell::Text(long), FieldType::Text).unwrap_err().kind,
            "too_long"
        );
        assert_eq!(
            conv(Cell::Text("z".into()), FieldType::Choice)
                .unwrap_err()
                .kind,
            "unknown_choice"
        );
        assert_eq!(
            conv(Cell::Text("abc".into()), FieldType::Number)
                .unwrap_err()
                .kind,
            "type_mismatch"
        );
        assert_eq!(
            conv(Cell::Decimal("NaN".into()), FieldType::Number)
                .unwrap_err()
                .kind,
            "type_mismatch"
        );
        assert_eq!(
            conv(Cell::Date(-40_000), FieldType::Date).unwrap_err().kind,
            "out_of_range"
        );
        assert_eq!(
            conv(Cell::Text("a@b".into()), FieldType::Person)
                .unwrap_err()
                .kind,
            "unknown_user"
        );
        assert_eq!(
            conv(Cell::Int(3), FieldType::Lookup).unwrap_err().kind,
            "lookup_missing"
        );
        let e = conv(Cell::Text("z".into()), FieldType::Choice).unwrap_err();
        assert!(e.to_string().contains("column c → field F"), "{e}");
    }

    #[test]
    fn item_values_read_back_in_the_pushed_form() {
        use serde_json::Map;
        let cases = [
            (FieldType::Number, Cell::Int(5), json!(5)),
            (
                FieldType::Currency,
                Cell::Decimal("12.50".into()),
                json!(12.5),
            ),
            (
                FieldType::Date,
                Cell::Date(1),
                json!("1970-01-02T00:00:00Z"),
            ),
            // Midnight in a UTC+1 site, and in a UTC-7 one.
            (
                FieldType::Date,
                Cell::Date(1),
                json!("1970-01-01T23:00:00Z"),
            ),
            (
                FieldType::Date,
                Cell::Date(1),
                json!("1970-01-02T07:00:00Z"),
            ),
            (
                FieldType::DateTime,
                Cell::Timestamp(1_000_000),
                json!("1970-01-01T00:00:01Z"),
            ),
            (FieldType::Choice, Cell::Text("a".into()), json!("a")),
            (
                FieldType::Hyperlink,
                Cell::Text("https://x".into()),
                json!({ "Url": "https://x", "Description": "typed by a person" }),
            ),
        ];
        for (t, cell, read) in cases {
            let pushed = conv(cell, t).unwrap();
            let mut f = Map::new();
            f.insert("F".into(), read);
            assert_eq!(canonical_from_item(&f, &m(t)), pushed, "{t}");
        }
        let mut f = Map::new();
        f.insert("FLookupId".into(), json!("6"));
        let r = Resolved {
            person: Some(6),
            lookup_item: None,
        };
        assert_eq!(
            canonical_from_item(&f, &m(FieldType::Person)),
            to_fields(&Cell::Text("x@y".into()), &m(FieldType::Person), &r).unwrap()
        );
        // Absent multi-choice reads as the annotated empty array, like a pushed NULL.
        assert_eq!(
            canonical_from_item(&Map::new(), &m(FieldType::MultiChoice)),
            conv(Cell::Null, FieldType::MultiChoice).unwrap()
        );
    }

    #[test]
    fn column_texts() {
        let c = |t: FieldType, v: Json| column_text(&[("F".into(), v)], &m(t), None).unwrap();
        assert_eq!(c(FieldType::Number, json!(5.0)), Some("5".into()));
        assert_eq!(c(FieldType::Currency, json!(12.5)), Some("12.5".into()));
        assert_eq!(c(FieldType::Text, Json::Null), None);
        assert_eq!(c(FieldType::Boolean, json!(true)), Some("true".into()));
        assert_eq!(
            c(FieldType::MultiChoice, json!(["a", "b\"c"])),
            Some("{\"a\",\"b\\\"c\"}".into())
        );
        assert_eq!(
            c(FieldType::Hyperlink, json!({"Url": "https://x"})),
            Some("https://x".into())
        );
        assert!(
            column_text(
                &[("FLookupId".into(), json!(3))],
                &m(FieldType::Lookup),
                None
            )
            .is_err()
        );
    }

    #[test]
    fn multichoice_person_lookup_shapes() {
        let v = conv(
            Cell::Array(vec![Cell::Text("a".into()), Cell::Text("b".into())]),
            FieldType::MultiChoice,
        )
        .unwrap();
        assert_eq!(
            v[0],
            ("F@odata.type".into(), json!("Collection(Edm.String)"))
        );
        assert_eq!(v[1], ("F".into(), json!(["a", "b"])));
        let r = Resolved {
            person: Some(6),
            lookup_item: Some("12".into()),
        };
        assert_eq!(
            to_fields(&Cell::Text("x@y".into()), &m(FieldType::Person), &r).unwrap(),
            vec![("FLookupId".into(), json!(6))]
        );
        assert_eq!(
            to_fields(&Cell::Int(1), &m(FieldType::Lookup), &r).unwrap(),
            vec![("FLookupId".into(), json!(12))]
        );
    }
}
