//! Encoder tests: every value is encoded by the hand-written binary writer and decoded by
//! `apache_avro` with the schema the encoder published, so both the mapping and the binary are
//! checked against the schema.

use std::sync::Arc;

use apache_avro::types::Value as Av;
use proptest::prelude::*;

use super::convert::{Scalar, civil_from_days, parse_array};
use super::*;
use crate::event::change::{ChangeEvent, Column, Op, Relation, Source, TypeKind, Value};

fn col(name: &str, oid: u32, type_name: &str, typmod: i32, kind: TypeKind) -> Column {
    Column {
        name: name.into(),
        type_oid: oid,
        type_name: type_name.into(),
        type_modifier: typmod,
        kind,
        is_key: false,
        nullable: true,
    }
}

fn key_col(name: &str, oid: u32, type_name: &str) -> Column {
    Column {
        is_key: true,
        nullable: false,
        ..col(name, oid, type_name, -1, TypeKind::Base)
    }
}

fn rel(version: u32, columns: Vec<Column>) -> Arc<Relation> {
    Arc::new(Relation {
        oid: 16_384,
        schema: "public".into(),
        name: "orders".into(),
        columns,
        replica_identity: 'd',
        version,
    })
}

fn source() -> Source {
    Source {
        connector: crate::event::change::CONNECTOR_WAL,
        pipeline: "demo".into(),
        db: "shop".into(),
        lsn: 0x16B_3748,
        tx_id: Some(771),
        commit_ts_ms: 1_700_000_000_123,
        origin: None,
        snapshot: false,
    }
}

fn event(relation: &Arc<Relation>, op: Op, before: Option<Row>, after: Option<Row>) -> ChangeEvent {
    ChangeEvent {
        relation: relation.clone(),
        op,
        before,
        after,
        source: source(),
        ts_ms: 1_700_000_000_999,
    }
}

fn t(s: &str) -> Value {
    Value::Text(s.into())
}

/// Encoder + a consumer-side resolver fed only with the emitted schemas-topic records.
struct Harness {
    enc: Encoder,
    res: SchemaResolver,
}

impl Harness {
    fn new() -> Self {
        Harness {
            enc: Encoder::new("demo"),
            res: SchemaResolver::new(),
        }
    }

    fn run(&mut self, ev: &ChangeEvent) -> Result<(Option<Av>, Av), EncodeError> {
        let e = self.enc.encode(ev)?;
        for (k, v) in &e.new_schemas {
            self.res.add_topic_record(k, v).unwrap();
        }
        let key = (!e.key.is_empty()).then(|| decode(&e.key, &self.res).unwrap());
        Ok((key, decode(&e.value, &self.res).unwrap()))
    }
}

fn get<'a>(record: &'a Av, name: &str) -> &'a Av {
    match record {
        Av::Record(fields) => {
            &fields
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no field {name}"))
                .1
        }
        other => panic!("not a record: {other:?}"),
    }
}

fn unwrap_union(v: &Av) -> (u32, &Av) {
    match v {
        Av::Union(i, inner) => (*i, inner),
        other => panic!("not a union: {other:?}"),
    }
}

/// `after.<field>` of a decoded envelope, as (union branch, value).
fn after_field(envelope: &Av, field: &str) -> (u32, Av) {
    let (i, after) = unwrap_union(get(envelope, "after"));
    assert_eq!(i, 1, "after must be present");
    let (b, v) = unwrap_union(get(after, field));
    (b, v.clone())
}

/// Encodes `text` as column `v` of the given type and returns (branch, decoded value).
fn one(c: Column, v: Value) -> Result<(u32, Av), EncodeError> {
    let mut c = c;
    c.name = "v".into();
    let r = rel(1, vec![key_col("id", 23, "integer"), c]);
    let mut h = Harness::new();
    let (_, env) = h.run(&event(&r, Op::Create, None, Some(vec![t("1"), v])))?;
    Ok(after_field(&env, "v"))
}

fn base(oid: u32, name: &str) -> Column {
    col("v", oid, name, -1, TypeKind::Base)
}

fn numeric(p: i32, s: i32) -> Column {
    col(
        "v",
        1700,
        &format!("numeric({p},{s})"),
        ((p << 16) | (s & 0x7ff)) + 4,
        TypeKind::Base,
    )
}

fn array(elem_oid: u32, name: &str) -> Column {
    col(
        "v",
        0,
        name,
        -1,
        TypeKind::Array {
            element_oid: elem_oid,
            element: Box::new(TypeKind::Base),
        },
    )
}

fn dec_str(v: &Av, scale: usize) -> String {
    match v {
        Av::Decimal(d) => decimal_to_string(&Vec::<u8>::try_from(d).unwrap(), scale),
        other => panic!("not a decimal: {other:?}"),
    }
}

#[test]
fn integers_and_bool() {
    assert_eq!(
        one(base(21, "smallint"), t("-32768")).unwrap(),
        (1, Av::Int(-32768))
    );
    assert_eq!(
        one(base(23, "integer"), t("2147483647")).unwrap(),
        (1, Av::Int(i32::MAX))
    );
    assert_eq!(
        one(base(20, "bigint"), t("-9223372036854775808")).unwrap(),
        (1, Av::Long(i64::MIN))
    );
    assert_eq!(
        one(base(16, "boolean"), t("t")).unwrap(),
        (1, Av::Boolean(true))
    );
    assert_eq!(
        one(base(16, "boolean"), t("false")).unwrap(),
        (1, Av::Boolean(false))
    );
    let err = one(base(23, "integer"), t("2147483648")).unwrap_err();
    assert!(
        matches!(err, EncodeError::InvalidValue { .. }) && !err.is_retryable(),
        "{err}"
    );
    assert!(one(base(16, "boolean"), t("yes")).is_err());
}

#[test]
fn numerics() {
    let (b, v) = one(numeric(12, 2), t("-12.34")).unwrap();
    assert_eq!((b, dec_str(&v, 2)), (1, "-12.34".into()));
    let (_, v) = one(numeric(12, 2), t("0.00")).unwrap();
    assert_eq!(dec_str(&v, 2), "0.00");
    let huge = format!("-{}.{}", "9".repeat(990), "1".repeat(10));
    let (_, v) = one(numeric(1000, 10), t(&huge)).unwrap();
    assert_eq!(dec_str(&v, 10), huge);
    // Negative scale (PG 15+): integers, Avro scale 0.
    let (_, v) = one(numeric(2, -3), t("-99000")).unwrap();
    assert_eq!(dec_str(&v, 0), "-99000");
    // NaN / ±Infinity cannot be an Avro decimal: the string branch carries the exact text.
    for special in ["NaN", "Infinity", "-Infinity"] {
        assert_eq!(
            one(numeric(12, 2), t(special)).unwrap(),
            (2, Av::String(special.into()))
        );
    }
    // Unconstrained numeric is an exact string.
    let unconstrained = col("v", 1700, "numeric", -1, TypeKind::Base);
    assert_eq!(
        one(unconstrained.clone(), t("123.4500000000000000000001")).unwrap(),
        (1, Av::String("123.4500000000000000000001".into()))
    );
    assert_eq!(
        one(unconstrained, t("NaN")).unwrap(),
        (1, Av::String("NaN".into()))
    );
    assert!(one(numeric(12, 2), t("12,5")).is_err());
}

#[test]
fn floats() {
    assert_eq!(
        one(base(700, "real"), t("1.5")).unwrap(),
        (1, Av::Float(1.5))
    );
    assert_eq!(
        one(base(701, "double precision"), t("1e+308")).unwrap(),
        (1, Av::Double(1e308))
    );
    assert_eq!(
        one(base(701, "double precision"), t("-Infinity")).unwrap(),
        (1, Av::Double(f64::NEG_INFINITY))
    );
    assert_eq!(
        one(base(700, "real"), t("Infinity")).unwrap(),
        (1, Av::Float(f32::INFINITY))
    );
    match one(base(701, "double precision"), t("NaN")).unwrap() {
        (1, Av::Double(d)) => assert!(d.is_nan()),
        other => panic!("{other:?}"),
    }
    match one(base(700, "real"), t("-0")).unwrap() {
        (1, Av::Float(f)) => assert!(f == 0.0 && f.is_sign_negative()),
        other => panic!("{other:?}"),
    }
    // Shortest-exact output of a float4 must not go through f64 (double rounding).
    assert_eq!(
        one(base(700, "real"), t("0.1")).unwrap(),
        (1, Av::Float(0.1_f32))
    );
}

#[test]
fn strings_null_and_empty() {
    assert_eq!(
        one(base(25, "text"), t("")).unwrap(),
        (1, Av::String(String::new()))
    );
    assert_eq!(one(base(25, "text"), Value::Null).unwrap(), (0, Av::Null));
    assert_eq!(
        one(base(1042, "character(3)"), t("ab ")).unwrap(),
        (1, Av::String("ab ".into()))
    );
    assert_eq!(
        one(base(25, "text"), t("NULL")).unwrap(),
        (1, Av::String("NULL".into()))
    );
    assert_eq!(
        one(base(3802, "jsonb"), t(r#"{"a": [1, null]}"#)).unwrap(),
        (1, Av::String(r#"{"a": [1, null]}"#.into()))
    );
    let enum_col = col("v", 90_000, "mood", -1, TypeKind::Enum);
    assert_eq!(
        one(enum_col, t("happy")).unwrap(),
        (1, Av::String("happy".into()))
    );
    let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    assert_eq!(
        one(base(2950, "uuid"), t(u)).unwrap(),
        (1, Av::Uuid(u.parse().unwrap()))
    );
    assert!(one(base(2950, "uuid"), t("a0eebc999c0b4ef8bb6d6bb9bd380a11")).is_err());
    assert_eq!(
        one(base(17, "bytea"), t("\\x00ff10")).unwrap(),
        (1, Av::Bytes(vec![0, 255, 16]))
    );
    assert_eq!(
        one(base(17, "bytea"), t("\\x")).unwrap(),
        (1, Av::Bytes(vec![]))
    );
}

#[test]
fn unknown_types_are_text() {
    let other = col("v", 3904, "int4range", -1, TypeKind::Other);
    assert_eq!(
        one(other, t("[1,5)")).unwrap(),
        (1, Av::String("[1,5)".into()))
    );
    let interval = base(1186, "interval");
    assert_eq!(
        one(interval, t("1 day 02:00:00")).unwrap(),
        (1, Av::String("1 day 02:00:00".into()))
    );
    let domain = col(
        "v",
        90_001,
        "positive_int",
        -1,
        TypeKind::Domain { base_oid: 23 },
    );
    assert_eq!(one(domain, t("7")).unwrap(), (1, Av::Int(7)));
}

#[test]
fn dates_and_times() {
    assert_eq!(
        one(base(1082, "date"), t("2024-02-29")).unwrap(),
        (1, Av::Date(19_782))
    );
    assert_eq!(
        one(base(1082, "date"), t("0001-12-31 BC")).unwrap(),
        (1, Av::Date(-719_163))
    );
    assert_eq!(
        one(base(1082, "date"), t("infinity")).unwrap(),
        (2, Av::String("infinity".into()))
    );
    assert_eq!(
        one(base(1082, "date"), t("-infinity")).unwrap(),
        (2, Av::String("-infinity".into()))
    );
    assert!(
        one(base(1082, "date"), t("02/29/2024")).is_err(),
        "non-ISO DateStyle is an error"
    );
    assert_eq!(
        one(base(1083, "time without time zone"), t("23:59:59.999999")).unwrap(),
        (1, Av::TimeMicros(86_399_999_999))
    );
    assert_eq!(
        one(
            base(1114, "timestamp without time zone"),
            t("2024-01-02 03:04:05.123456")
        )
        .unwrap(),
        (1, Av::LocalTimestampMicros(1_704_164_645_123_456))
    );
    let tz = || base(1184, "timestamp with time zone");
    for text in [
        "2024-01-02 03:04:05.123456+00",
        "2024-01-02 04:04:05.123456+01",
        "2024-01-02 08:34:05.123456+05:30",
        "2024-01-01 22:04:05.123456-05",
        "2024-01-02 03:04:20.123456+00:00:15",
    ] {
        assert_eq!(
            one(tz(), t(text)).unwrap(),
            (1, Av::TimestampMicros(1_704_164_645_123_456)),
            "{text}"
        );
    }
    assert_eq!(
        one(tz(), t("infinity")).unwrap(),
        (2, Av::String("infinity".into()))
    );
    match one(tz(), t("0044-03-15 12:00:00+00 BC")).unwrap() {
        (1, Av::TimestampMicros(us)) => assert!(us < -62_000_000_000_000_000),
        other => panic!("{other:?}"),
    }
}

#[test]
fn arrays() {
    let some = |v| Av::Union(1, Box::new(v));
    let null = Av::Union(0, Box::new(Av::Null));
    assert_eq!(
        one(array(23, "integer[]"), t("{1,-2,NULL}")).unwrap(),
        (
            1,
            Av::Array(vec![some(Av::Int(1)), some(Av::Int(-2)), null.clone()])
        )
    );
    assert_eq!(
        one(array(23, "integer[]"), t("{}")).unwrap(),
        (1, Av::Array(vec![]))
    );
    assert_eq!(
        one(
            array(25, "text[]"),
            t(r#"{"a,b","q\"uote","back\\slash","NULL",NULL,""}"#)
        )
        .unwrap(),
        (
            1,
            Av::Array(vec![
                some(Av::String("a,b".into())),
                some(Av::String("q\"uote".into())),
                some(Av::String("back\\slash".into())),
                some(Av::String("NULL".into())),
                null,
                some(Av::String(String::new())),
            ])
        )
    );
    // Multi-dimensional / non-default bounds / unrepresentable elements: exact text in the
    // string branch.
    for text in ["{{1,2},{3,4}}", "[0:1]={1,2}"] {
        assert_eq!(
            one(array(23, "integer[]"), t(text)).unwrap(),
            (2, Av::String(text.into()))
        );
    }
    assert_eq!(
        one(array(1082, "date[]"), t("{2024-01-01,infinity}")).unwrap(),
        (2, Av::String("{2024-01-01,infinity}".into()))
    );
    let mut numeric_array = numeric(5, 2);
    numeric_array.kind = TypeKind::Array {
        element_oid: 1700,
        element: Box::new(TypeKind::Base),
    };
    let (b, v) = one(numeric_array, t("{1.50,-2.25}")).unwrap();
    assert_eq!(b, 1);
    let Av::Array(items) = v else { panic!() };
    assert_eq!(dec_str(unwrap_union(&items[1]).1, 2), "-2.25");
    assert!(one(array(23, "integer[]"), t("{1,x}")).is_err());
    assert!(one(array(23, "integer[]"), t("1,2")).is_err());
}

#[test]
fn unchanged_toast_is_neither_null_nor_a_string() {
    // text: [null, string, Unchanged]; numeric(12,2): [null, decimal, string, Unchanged].
    let unchanged = Av::Enum(0, UNCHANGED_SYMBOL.into());
    assert_eq!(
        one(base(25, "text"), Value::UnchangedToast).unwrap(),
        (2, unchanged.clone())
    );
    assert_eq!(
        one(numeric(12, 2), Value::UnchangedToast).unwrap(),
        (3, unchanged.clone())
    );
    assert_eq!(
        one(array(23, "integer[]"), Value::UnchangedToast).unwrap(),
        (3, unchanged)
    );
    // A fixed-length type cannot be TOASTed: the reader handed us something impossible.
    let err = one(base(23, "integer"), Value::UnchangedToast).unwrap_err();
    assert!(
        matches!(err, EncodeError::UnexpectedUnchanged { .. }),
        "{err}"
    );
}

fn orders_v1() -> Arc<Relation> {
    rel(
        1,
        vec![
            key_col("id", 20, "bigint"),
            col("note", 25, "text", -1, TypeKind::Base),
            col(
                "total",
                1700,
                "numeric(12,2)",
                ((12 << 16) | 2) + 4,
                TypeKind::Base,
            ),
        ],
    )
}

#[test]
fn envelope_source_key_and_ops() {
    let r = orders_v1();
    let mut h = Harness::new();
    let row = vec![t("42"), t("hello"), t("9.99")];
    let (key, env) = h
        .run(&event(&r, Op::Create, None, Some(row.clone())))
        .unwrap();
    assert_eq!(key, Some(Av::Record(vec![("id".into(), Av::Long(42))])));
    assert_eq!(get(&env, "op"), &Av::String("c".into()));
    assert_eq!(get(&env, "before"), &Av::Union(0, Box::new(Av::Null)));
    assert_eq!(
        get(&env, "ts_ms"),
        &Av::Union(1, Box::new(Av::Long(1_700_000_000_999)))
    );
    let src = get(&env, "source");
    assert_eq!(get(src, "connector"), &Av::String("syncbridge".into()));
    assert_eq!(get(src, "name"), &Av::String("demo".into()));
    assert_eq!(get(src, "db"), &Av::String("shop".into()));
    assert_eq!(get(src, "schema"), &Av::String("public".into()));
    assert_eq!(get(src, "table"), &Av::String("orders".into()));
    assert_eq!(get(src, "ts_ms"), &Av::Long(1_700_000_000_123));
    assert_eq!(get(src, "snapshot"), &Av::String("false".into()));
    assert_eq!(get(src, "txId"), &Av::Union(1, Box::new(Av::Long(771))));
    assert_eq!(
        get(src, "lsn"),
        &Av::Union(1, Box::new(Av::Long(0x16B_3748)))
    );
    assert_eq!(get(src, "origin"), &Av::Union(0, Box::new(Av::Null)));

    // Delete under REPLICA IDENTITY DEFAULT: before holds the key, other columns NULL.
    let old = vec![t("42"), Value::Null, Value::Null];
    let (key, env) = h.run(&event(&r, Op::Delete, Some(old), None)).unwrap();
    assert_eq!(key, Some(Av::Record(vec![("id".into(), Av::Long(42))])));
    assert_eq!(get(&env, "op"), &Av::String("d".into()));
    assert_eq!(get(&env, "after"), &Av::Union(0, Box::new(Av::Null)));

    // Truncate: no key (a null Kafka key, like Debezium), no images.
    let e = h.enc.encode(&event(&r, Op::Truncate, None, None)).unwrap();
    assert!(e.key.is_empty() && e.key_fingerprint.is_none());
    let env = decode(&e.value, &h.res).unwrap();
    assert_eq!(get(&env, "op"), &Av::String("t".into()));

    // Snapshot read with an origin.
    let mut ev = event(&r, Op::Read, None, Some(row));
    ev.source.snapshot = true;
    ev.source.origin = Some("syncbridge_demo".into());
    let (_, env) = h.run(&ev).unwrap();
    let src = get(&env, "source");
    assert_eq!(get(src, "snapshot"), &Av::String("true".into()));
    assert_eq!(
        get(src, "origin"),
        &Av::Union(1, Box::new(Av::String("syncbridge_demo".into())))
    );
}

#[test]
fn bad_events_are_data_errors() {
    let r = orders_v1();
    let mut enc = Encoder::new("demo");
    let errs = [
        enc.encode(&event(&r, Op::Create, None, Some(vec![t("1")])))
            .unwrap_err(),
        enc.encode(&event(&r, Op::Update, None, None)).unwrap_err(),
        enc.encode(&event(&r, Op::Delete, None, None)).unwrap_err(),
        enc.encode(&event(
            &r,
            Op::Create,
            None,
            Some(vec![Value::Null, t("x"), t("1")]),
        ))
        .unwrap_err(),
        enc.encode(&event(
            &r,
            Op::Create,
            None,
            Some(vec![t("x"), t("x"), t("1")]),
        ))
        .unwrap_err(),
    ];
    assert!(matches!(errs[0], EncodeError::RowShape { .. }));
    assert!(matches!(
        errs[1],
        EncodeError::MissingImage { image: "after", .. }
    ));
    assert!(matches!(
        errs[2],
        EncodeError::MissingImage {
            image: "before",
            ..
        }
    ));
    assert!(matches!(errs[3], EncodeError::KeyUnavailable { .. }));
    assert!(matches!(errs[4], EncodeError::InvalidValue { .. }));
    assert!(errs.iter().all(|e| !e.is_retryable()));
    // A failed event must not swallow the schemas: the next good event still carries them.
    let ok = enc
        .encode(&event(
            &r,
            Op::Create,
            None,
            Some(vec![t("1"), t("x"), t("1")]),
        ))
        .unwrap();
    assert_eq!(ok.new_schemas.len(), 2);
}

#[test]
fn toasted_key_falls_back_to_the_old_image() {
    let r = rel(
        1,
        vec![
            Column {
                is_key: true,
                nullable: false,
                ..base(25, "text")
            },
            base(23, "integer"),
        ],
    );
    let mut h = Harness::new();
    let ev = event(
        &r,
        Op::Update,
        Some(vec![t("k"), Value::Null]),
        Some(vec![Value::UnchangedToast, t("2")]),
    );
    let (key, env) = h.run(&ev).unwrap();
    assert_eq!(
        key,
        Some(Av::Record(vec![("v".into(), Av::String("k".into()))]))
    );
    assert_eq!(
        after_field(&env, "v").0,
        2,
        "after keeps the unchanged marker"
    );
    let ev = event(
        &r,
        Op::Update,
        None,
        Some(vec![Value::UnchangedToast, t("2")]),
    );
    assert!(matches!(
        h.enc.encode(&ev),
        Err(EncodeError::KeyUnavailable { .. })
    ));
}

#[test]
fn schema_evolution_and_caching() {
    let mut h = Harness::new();
    let v1 = orders_v1();
    let first = h
        .enc
        .encode(&event(
            &v1,
            Op::Create,
            None,
            Some(vec![t("1"), t("a"), t("1.00")]),
        ))
        .unwrap();
    assert_eq!(first.new_schemas.len(), 2, "key + envelope");
    for (k, v) in &first.new_schemas {
        h.res.add_topic_record(k, v).unwrap();
    }
    let again = h
        .enc
        .encode(&event(
            &v1,
            Op::Create,
            None,
            Some(vec![t("2"), t("b"), t("2.00")]),
        ))
        .unwrap();
    assert!(again.new_schemas.is_empty());
    assert_eq!(again.value_fingerprint, first.value_fingerprint);

    // ADD COLUMN: a new relation version → a new envelope schema; the key schema is unchanged.
    let mut cols = v1.columns.clone();
    cols.push(col(
        "shipped",
        1184,
        "timestamp with time zone",
        -1,
        TypeKind::Base,
    ));
    let v2 = rel(2, cols);
    let (_, env) = h
        .run(&event(
            &v2,
            Op::Create,
            None,
            Some(vec![t("3"), t("c"), t("3.00"), t("2024-01-01 00:00:00+00")]),
        ))
        .unwrap();
    assert_eq!(
        after_field(&env, "shipped"),
        (1, Av::TimestampMicros(1_704_067_200_000_000))
    );
    assert_eq!(h.res.len(), 3);
    // Old events still decode.
    assert!(decode(&first.value, &h.res).is_ok());

    // Same shape under a new version number: same schema, nothing new to publish.
    let v3 = rel(3, v1.columns.clone());
    let e = h
        .enc
        .encode(&event(
            &v3,
            Op::Create,
            None,
            Some(vec![t("4"), t("d"), t("4.00")]),
        ))
        .unwrap();
    assert!(e.new_schemas.is_empty());
    assert_eq!(e.value_fingerprint, first.value_fingerprint);

    // forget_emitted: everything is offered again (after a failed schemas-topic append).
    h.enc.forget_emitted();
    let e = h
        .enc
        .encode(&event(
            &v3,
            Op::Create,
            None,
            Some(vec![t("4"), t("d"), t("4.00")]),
        ))
        .unwrap();
    assert_eq!(e.new_schemas.len(), 2);
}

#[test]
fn logical_type_change_gets_a_new_fingerprint() {
    // timestamp → timestamptz and numeric(12,2) → numeric(12,4) have the same Parsing Canonical
    // Form; the encoder must not reuse (and so overwrite) the earlier fingerprint.
    let mut h = Harness::new();
    let a = rel(
        1,
        vec![
            key_col("id", 23, "integer"),
            base(1114, "timestamp without time zone"),
        ],
    );
    let b = rel(
        2,
        vec![
            key_col("id", 23, "integer"),
            base(1184, "timestamp with time zone"),
        ],
    );
    let text = "2024-01-02 03:04:05+01";
    let ea = h
        .enc
        .encode(&event(
            &a,
            Op::Create,
            None,
            Some(vec![t("1"), t("2024-01-02 03:04:05")]),
        ))
        .unwrap();
    let eb = h
        .enc
        .encode(&event(&b, Op::Create, None, Some(vec![t("1"), t(text)])))
        .unwrap();
    assert_ne!(ea.value_fingerprint, eb.value_fingerprint);
    for (k, v) in ea.new_schemas.iter().chain(&eb.new_schemas) {
        h.res.add_topic_record(k, v).unwrap();
    }
    let da = decode(&ea.value, &h.res).unwrap();
    let db = decode(&eb.value, &h.res).unwrap();
    assert_eq!(
        after_field(&da, "v").1,
        Av::LocalTimestampMicros(1_704_164_645_000_000)
    );
    assert_eq!(
        after_field(&db, "v").1,
        Av::TimestampMicros(1_704_161_045_000_000)
    );

    // A restarted encoder that preloaded the topic behaves the same and re-emits nothing old.
    let mut enc = Encoder::new("demo");
    for (k, v) in ea.new_schemas.iter().chain(&eb.new_schemas) {
        enc.preload_schema(k, v).unwrap();
    }
    let eb2 = enc
        .encode(&event(&b, Op::Create, None, Some(vec![t("1"), t(text)])))
        .unwrap();
    assert_eq!(eb2.value_fingerprint, eb.value_fingerprint);
    assert!(eb2.new_schemas.is_empty());
    assert!(
        enc.preload_schema("0000000000000000", &ea.new_schemas[0].1)
            .is_err()
    );
}

#[test]
fn topic_names_and_framing() {
    assert_eq!(
        topic_name("sb", "demo", "public", "orders"),
        "sb.demo.public.orders"
    );
    assert_eq!(
        topic_name("sb", "demo", "my schema", "Ördêr"),
        "sb.demo.my_schema._rd_r"
    );
    assert_eq!(schemas_topic("sb", "demo"), "sb.demo.schemas");
    let mut h = Harness::new();
    let r = orders_v1();
    let e = h
        .enc
        .encode(&event(
            &r,
            Op::Create,
            None,
            Some(vec![t("1"), t("a"), t("1.00")]),
        ))
        .unwrap();
    assert_eq!(e.value[..2], SINGLE_OBJECT_MAGIC);
    assert_eq!(
        fingerprint_hex(e.value_fingerprint),
        hex::encode(&e.value[2..10])
    );
    let c = to_confluent(&e.value, 7).unwrap();
    assert_eq!(c[..5], [0, 0, 0, 0, 7]);
    assert!(matches!(
        decode(&c, &h.res),
        Err(DecodeError::NeedsRegistry(7))
    ));
    assert!(to_confluent(&[1, 2], 7).is_none());
}

#[test]
fn decoder_rejects_garbage() {
    let mut h = Harness::new();
    let r = orders_v1();
    let e = h
        .enc
        .encode(&event(
            &r,
            Op::Create,
            None,
            Some(vec![t("1"), t("a"), t("1.00")]),
        ))
        .unwrap();
    for (k, v) in &e.new_schemas {
        h.res.add_topic_record(k, v).unwrap();
    }
    assert!(matches!(decode(&[], &h.res), Err(DecodeError::TooShort(0))));
    assert!(matches!(
        decode(&[0xC3, 0x02, 0, 0, 0, 0, 0, 0, 0, 0], &h.res),
        Err(DecodeError::BadMagic(_))
    ));
    let mut unknown = e.value.clone();
    unknown[2] ^= 0xff;
    assert!(matches!(
        decode(&unknown, &h.res),
        Err(DecodeError::UnknownFingerprint(_))
    ));
    let mut trailing = e.value.clone();
    trailing.push(0);
    assert!(matches!(
        decode(&trailing, &h.res),
        Err(DecodeError::TrailingBytes(1))
    ));
    assert!(matches!(
        decode(&e.value[..e.value.len() - 1], &h.res),
        Err(DecodeError::Body(_))
    ));
    let (k, v) = &e.new_schemas[1];
    assert!(matches!(
        h.res.add_topic_record(&k.replace('a', "b"), v),
        Err(DecodeError::FingerprintMismatch { .. }) | Err(DecodeError::Schema { .. })
    ));
    assert!(h.res.add_topic_record(k, "{").is_err());
}

#[test]
#[ignore = "micro-benchmark; run with --ignored --nocapture"]
fn bench_encode() {
    let r = rel(
        1,
        vec![
            key_col("id", 20, "bigint"),
            base(25, "text"),
            numeric(12, 2),
            base(1184, "timestamp with time zone"),
            base(16, "boolean"),
            base(3802, "jsonb"),
            base(2950, "uuid"),
        ],
    );
    let mut enc = Encoder::new("demo");
    let n = 200_000;
    let events: Vec<_> = (0..1000)
        .map(|i| {
            event(
                &r,
                Op::Update,
                None,
                Some(vec![
                    t(&i.to_string()),
                    t("some customer note of moderate length"),
                    t("12345.67"),
                    t("2024-01-02 03:04:05.123456+01"),
                    t("t"),
                    t(r#"{"k": "v", "n": 1}"#),
                    t("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
                ]),
            )
        })
        .collect();
    let start = std::time::Instant::now();
    let mut bytes = 0;
    for i in 0..n {
        let e = enc.encode(&events[i % events.len()]).unwrap();
        bytes += e.value.len() + e.key.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "encode: {:.0} events/s, {:.1} MB/s out",
        n as f64 / secs,
        bytes as f64 / secs / 1e6
    );

    // For comparison: apache_avro's Value path, serialisation only (Values already built, no
    // text parsing), i.e. a lower bound on its cost for the same envelopes.
    let e = Encoder::new("demo").encode(&events[0]).unwrap();
    let schema = apache_avro::Schema::parse_str(&e.new_schemas[1].1).unwrap();
    let mut res = SchemaResolver::new();
    for (k, v) in &e.new_schemas {
        res.add_topic_record(k, v).unwrap();
    }
    let value = decode(&e.value, &res).unwrap();
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap();
    let m = n / 4;
    let start = std::time::Instant::now();
    for _ in 0..m {
        let out = writer.write_value_to_vec(value.clone()).unwrap();
        assert_eq!(out[..], e.value[10..]);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "apache_avro Value path (serialise only): {:.0} events/s",
        m as f64 / secs
    );
}

// ---------------------------------------------------------------- properties

fn all_scalars() -> Vec<Scalar> {
    vec![
        Scalar::Bool,
        Scalar::Int,
        Scalar::Long,
        Scalar::Float,
        Scalar::Double,
        Scalar::Decimal {
            precision: 12,
            scale: 2,
        },
        Scalar::Decimal {
            precision: 1,
            scale: 0,
        },
        Scalar::String,
        Scalar::Json,
        Scalar::Uuid,
        Scalar::Bytes,
        Scalar::Date,
        Scalar::Time,
        Scalar::Timestamp,
        Scalar::TimestampTz,
    ]
}

/// Formats days since the epoch the way PostgreSQL does (ISO, ` BC` suffix).
fn pg_date(days: i64) -> (String, &'static str) {
    let (y, m, d) = civil_from_days(days);
    if y <= 0 {
        (format!("{:04}-{m:02}-{d:02}", 1 - y), " BC")
    } else {
        (format!("{y:04}-{m:02}-{d:02}"), "")
    }
}

fn pg_array(items: &[Option<String>]) -> String {
    let inner: Vec<String> = items
        .iter()
        .map(|i| match i {
            None => "NULL".into(),
            Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Text-ish inputs that hit the parsers' interesting paths more often than random strings.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[-+0-9.:eE ,{}\"\\\\xBCNaInfity]{0,40}",
        "[0-9]{1,7}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,7})?([+-][0-9]{2}(:[0-9]{2}){0,3})?)?( BC)?",
    ]
}

proptest! {
    #[test]
    fn scalars_never_panic(text in texty()) {
        for s in all_scalars() {
            let mut out = Vec::new();
            let _ = s.write(&text, &mut out);
        }
        let _ = parse_array(&text);
    }

    #[test]
    fn encoder_never_panics(texts in proptest::collection::vec(proptest::option::of(texty()), 8)) {
        let r = rel(1, vec![
            key_col("id", 25, "text"),
            numeric(5, 2),
            base(1082, "date"),
            base(1184, "timestamp with time zone"),
            array(23, "integer[]"),
            base(17, "bytea"),
            base(700, "real"),
            col("v", 1, "x", -1, TypeKind::Other),
        ]);
        let row: Row = texts.into_iter().map(|t| t.map_or(Value::Null, Value::Text)).collect();
        let mut h = Harness::new();
        // Whatever the text, either an error or bytes that decode with the published schema.
        if let Ok(e) = h.enc.encode(&event(&r, Op::Update, Some(row.clone()), Some(row))) {
            for (k, v) in &e.new_schemas {
                h.res.add_topic_record(k, v).unwrap();
            }
            prop_assert!(decode(&e.value, &h.res).is_ok());
            prop_assert!(decode(&e.key, &h.res).is_ok());
        }
    }

    #[test]
    fn decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200), raw in any::<bool>()) {
        let mut h = Harness::new();
        let r = orders_v1();
        let e = h.enc.encode(&event(&r, Op::Create, None, Some(vec![t("1"), t("a"), t("1.00")]))).unwrap();
        for (k, v) in &e.new_schemas {
            h.res.add_topic_record(k, v).unwrap();
        }
        let bytes = if raw { body } else { [&e.value[..10], &body[..]].concat() };
        let _ = decode(&bytes, &h.res);
    }

    #[test]
    fn int_round_trip(i in any::<i32>(), l in any::<i64>()) {
        prop_assert_eq!(one(base(23, "integer"), t(&i.to_string())).unwrap(), (1, Av::Int(i)));
        prop_assert_eq!(one(base(20, "bigint"), t(&l.to_string())).unwrap(), (1, Av::Long(l)));
    }

    #[test]
    fn float_round_trip(f in any::<u32>(), d in any::<u64>()) {
        let (f, d) = (f32::from_bits(f), f64::from_bits(d));
        let pg = |nan: bool, inf: bool, neg: bool, s: String| {
            if nan { "NaN".to_string() } else if inf { if neg { "-Infinity".into() } else { "Infinity".into() } } else { s }
        };
        let ft = pg(f.is_nan(), f.is_infinite(), f < 0.0, format!("{f:e}"));
        let dt = pg(d.is_nan(), d.is_infinite(), d < 0.0, format!("{d:e}"));
        match one(base(700, "real"), t(&ft)).unwrap() {
            (1, Av::Float(g)) => prop_assert!(g.to_bits() == f.to_bits() || (f.is_nan() && g.is_nan())),
            other => prop_assert!(false, "{:?}", other),
        }
        match one(base(701, "double precision"), t(&dt)).unwrap() {
            (1, Av::Double(g)) => prop_assert!(g.to_bits() == d.to_bits() || (d.is_nan() && g.is_nan())),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn numeric_round_trip(neg in any::<bool>(), int in "(0|[1-9][0-9]{0,30})", frac in "[0-9]{0,8}") {
        let scale = 8;
        let text = format!("{}{int}.{frac:0<8}", if neg { "-" } else { "" });
        let (b, v) = one(numeric(40, scale), t(&text)).unwrap();
        prop_assert_eq!(b, 1);
        let back = dec_str(&v, scale as usize);
        // PostgreSQL never prints "-0.00000000"; the decimal has no negative zero either.
        let zero = int == "0" && frac.bytes().all(|c| c == b'0');
        prop_assert_eq!(back, if zero { text.trim_start_matches('-').to_string() } else { text });
    }

    #[test]
    fn date_round_trip(days in -2_451_545_i64..2_147_483_000) {
        let (ymd, bc) = pg_date(days);
        prop_assert_eq!(one(base(1082, "date"), t(&format!("{ymd}{bc}"))).unwrap(), (1, Av::Date(days as i32)));
    }

    #[test]
    fn timestamptz_round_trip(
        us in -210_000_000_000_000_000_i64..9_200_000_000_000_000_000,
        off in -57_599_i64..57_599,
    ) {
        let local = us + off * 1_000_000;
        let (days, in_day) = (local.div_euclid(86_400_000_000), local.rem_euclid(86_400_000_000));
        let (ymd, bc) = pg_date(days);
        let secs = in_day / 1_000_000;
        let sign = if off < 0 { '-' } else { '+' };
        let a = off.abs();
        let text = format!(
            "{ymd} {:02}:{:02}:{:02}.{:06}{sign}{:02}:{:02}:{:02}{bc}",
            secs / 3600, secs / 60 % 60, secs % 60, in_day % 1_000_000, a / 3600, a / 60 % 60, a % 60
        );
        prop_assert_eq!(
            one(base(1184, "timestamp with time zone"), t(&text)).unwrap(),
            (1, Av::TimestampMicros(us)),
            "{}", text
        );
    }

    #[test]
    fn text_bytes_and_array_round_trip(
        s in any::<String>(),
        b in proptest::collection::vec(any::<u8>(), 0..64),
        items in proptest::collection::vec(proptest::option::of(any::<String>()), 0..8),
    ) {
        prop_assert_eq!(one(base(25, "text"), t(&s)).unwrap(), (1, Av::String(s)));
        prop_assert_eq!(one(base(17, "bytea"), t(&format!("\\x{}", hex::encode(&b)))).unwrap(), (1, Av::Bytes(b)));
        let expected: Vec<Av> = items.iter().map(|i| match i {
            None => Av::Union(0, Box::new(Av::Null)),
            Some(s) => Av::Union(1, Box::new(Av::String(s.clone()))),
        }).collect();
        prop_assert_eq!(one(array(25, "text[]"), t(&pg_array(&items))).unwrap(), (1, Av::Array(expected)));
    }
}
