//! A consumer's view of the change-event encoding: events are decoded with nothing but the files
//! in `schemas/` and the records of the `<prefix>.<pipeline>.schemas` topic (here: the encoder's
//! `new_schemas`), as `schemas/README.md` promises.
//!
//! `SB_BLESS_SCHEMAS=1 cargo test --test capture_decode` rewrites the committed example schemas
//! from the encoder (review the diff: a change there is a change of the published format).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use apache_avro::types::Value as Av;
use syncbridge::event::change::{ChangeEvent, Column, Op, Relation, Row, Source, TypeKind, Value};
use syncbridge::event::{
    DecodeError, EncodedEvent, Encoder, SchemaResolver, UNCHANGED_SYMBOL, decimal_to_string,
    decode, source_schema_json, unchanged_schema_json,
};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn column(name: &str, oid: u32, type_name: &str, typmod: i32, key: bool, nullable: bool) -> Column {
    Column {
        name: name.into(),
        type_oid: oid,
        type_name: type_name.into(),
        type_modifier: typmod,
        kind: TypeKind::Base,
        is_key: key,
        nullable,
    }
}

fn numeric_typmod(p: i32, s: i32) -> i32 {
    ((p << 16) | s) + 4
}

/// `public.demo_tasks` of `ops/demo.sql`, as the reader's catalog query describes it.
fn demo_tasks() -> Arc<Relation> {
    Arc::new(Relation {
        oid: 16_385,
        schema: "public".into(),
        name: "demo_tasks".into(),
        columns: vec![
            column("id", 20, "bigint", -1, true, false),
            column("title", 25, "text", -1, false, false),
            column("status", 25, "text", -1, false, false),
            column("priority", 23, "integer", -1, false, false),
            column("due", 1082, "date", -1, false, true),
            column(
                "amount",
                1700,
                "numeric(12,2)",
                numeric_typmod(12, 2),
                false,
                true,
            ),
            column("notes", 25, "text", -1, false, true),
            column(
                "updated_at",
                1184,
                "timestamp with time zone",
                -1,
                false,
                false,
            ),
        ],
        replica_identity: 'd',
        version: 1,
    })
}

/// One column of every mapped kind (pipeline `example`), committed as the type-mapping showcase.
fn all_types() -> Arc<Relation> {
    let array = |name: &str, elem: u32, type_name: &str| Column {
        kind: TypeKind::Array {
            element_oid: elem,
            element: Box::new(TypeKind::Base),
        },
        ..column(name, 1007, type_name, -1, false, true)
    };
    Arc::new(Relation {
        oid: 16_400,
        schema: "public".into(),
        name: "all_types".into(),
        columns: vec![
            column("id", 2950, "uuid", -1, true, false),
            column("seq", 20, "bigint", -1, true, false),
            column("c_int2", 21, "smallint", -1, false, true),
            column("c_int4", 23, "integer", -1, false, true),
            column(
                "c_numeric",
                1700,
                "numeric(20,4)",
                numeric_typmod(20, 4),
                false,
                true,
            ),
            column("c_numeric_free", 1700, "numeric", -1, false, true),
            column("c_float4", 700, "real", -1, false, true),
            column("c_float8", 701, "double precision", -1, false, true),
            column("c_bool", 16, "boolean", -1, false, true),
            column("c_varchar", 1043, "character varying(40)", 44, false, true),
            column("c_char", 1042, "character(3)", 7, false, true),
            column("c_date", 1082, "date", -1, false, true),
            column("c_time", 1083, "time without time zone", -1, false, true),
            column("c_ts", 1114, "timestamp without time zone", -1, false, true),
            column("c_tstz", 1184, "timestamp with time zone", -1, false, true),
            column("c_json", 114, "json", -1, false, true),
            column("c_jsonb", 3802, "jsonb", -1, false, true),
            column("c_bytea", 17, "bytea", -1, false, true),
            Column {
                kind: TypeKind::Enum,
                ..column("c_enum", 90_000, "mood", -1, false, true)
            },
            array("c_int_array", 23, "integer[]"),
            array("c_text_array", 25, "text[]"),
            Column {
                kind: TypeKind::Other,
                ..column("c_range", 3904, "int4range", -1, false, true)
            },
            column("Odd Name!", 25, "text", -1, false, true),
        ],
        replica_identity: 'd',
        version: 1,
    })
}

fn event(
    rel: &Arc<Relation>,
    pipeline: &str,
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
) -> ChangeEvent {
    ChangeEvent {
        relation: rel.clone(),
        op,
        before,
        after,
        source: Source {
            connector: syncbridge::event::change::CONNECTOR_WAL,
            pipeline: pipeline.into(),
            db: "syncbridge".into(),
            lsn: 0x0100_0000_0000,
            tx_id: Some(900),
            commit_ts_ms: 1_767_225_600_000,
            origin: None,
            snapshot: op == Op::Read,
        },
        ts_ms: 1_767_225_600_500,
    }
}

fn t(s: &str) -> Value {
    Value::Text(s.into())
}

fn demo_row(id: &str, notes: Value) -> Row {
    vec![
        t(id),
        t("Task 1"),
        t("open"),
        t("3"),
        t("2026-12-02"),
        t("37.50"),
        notes,
        t("2026-01-01 10:00:00.25+02"),
    ]
}

fn all_types_row() -> Row {
    vec![
        t("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        t("7"),
        t("-32768"),
        t("2147483647"),
        t("-1234567890123456.7891"),
        t("NaN"),
        t("3.4028235e+38"),
        t("-Infinity"),
        t("t"),
        t(""),
        t("ab "),
        t("infinity"),
        t("24:00:00"),
        t("0044-03-15 12:00:00 BC"),
        t("2024-06-30 23:59:59.999999-09:30"),
        t(r#"{"a":1}"#),
        t(r#"{"b": [true, null]}"#),
        t("\\xdeadbeef"),
        t("happy"),
        t("{1,NULL,-3}"),
        t(r#"{"x,y","say \"hi\"",NULL,"NULL"}"#),
        t("[1,5)"),
        Value::Null,
    ]
}

fn get<'a>(record: &'a Av, name: &str) -> &'a Av {
    match record {
        Av::Record(fields) => &fields.iter().find(|(n, _)| n == name).expect(name).1,
        other => panic!("not a record: {other:?}"),
    }
}

fn branch(v: &Av) -> (u32, &Av) {
    match v {
        Av::Union(i, inner) => (*i, inner),
        other => panic!("not a union: {other:?}"),
    }
}

/// `<image>.<field>` of a decoded envelope as (union branch, value).
fn field<'a>(envelope: &'a Av, image: &str, name: &str) -> (u32, &'a Av) {
    let (present, record) = branch(get(envelope, image));
    assert_eq!(present, 1, "{image} is null");
    branch(get(record, name))
}

fn decimal(v: &Av, scale: usize) -> String {
    match v {
        Av::Decimal(d) => decimal_to_string(&Vec::<u8>::try_from(d).unwrap(), scale),
        other => panic!("not a decimal: {other:?}"),
    }
}

fn full_name(schema_json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(schema_json).unwrap();
    format!(
        "{}.{}",
        v["namespace"].as_str().unwrap(),
        v["name"].as_str().unwrap()
    )
}

fn pretty(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    serde_json::to_string_pretty(&v).unwrap() + "\n"
}

/// The committed files are exactly what the encoder publishes (bless with SB_BLESS_SCHEMAS=1).
#[test]
fn committed_schemas_match_the_encoder() {
    let bless = std::env::var_os("SB_BLESS_SCHEMAS").is_some();
    let mut expected: Vec<(String, String)> = vec![
        (
            "sb.Source".into(),
            pretty(&source_schema_json().to_string()),
        ),
        (
            "sb.Unchanged".into(),
            pretty(&unchanged_schema_json().to_string()),
        ),
    ];
    for (pipeline, rel, row) in [
        ("demo", demo_tasks(), demo_row("1", t("n"))),
        ("example", all_types(), all_types_row()),
    ] {
        let e = Encoder::new(pipeline)
            .encode(&event(&rel, pipeline, Op::Create, None, Some(row)))
            .unwrap();
        assert_eq!(e.new_schemas.len(), 2);
        for (_, json) in e.new_schemas {
            expected.push((full_name(&json), pretty(&json)));
        }
    }
    let mut stale = Vec::new();
    for (name, json) in expected {
        let path = schemas_dir().join(format!("{name}.avsc"));
        if bless {
            std::fs::write(&path, &json).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(json.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale schema files (SB_BLESS_SCHEMAS=1 to rewrite): {stale:?}"
    );
}

/// A table whose schema is committed decodes with `schemas/` alone, for every op, and an
/// unchanged TOAST value is distinguishable from NULL and from any string.
#[test]
fn demo_events_decode_with_the_schemas_dir_only() {
    let resolver = SchemaResolver::from_dir(schemas_dir()).unwrap();
    let rel = demo_tasks();
    let mut enc = Encoder::new("demo");
    let mut run = |op, before, after| -> (Av, Option<Av>) {
        let e: EncodedEvent = enc.encode(&event(&rel, "demo", op, before, after)).unwrap();
        let key = (!e.key.is_empty()).then(|| decode(&e.key, &resolver).unwrap());
        (decode(&e.value, &resolver).unwrap(), key)
    };

    let (env, key) = run(Op::Create, None, Some(demo_row("1", t("first"))));
    assert_eq!(key, Some(Av::Record(vec![("id".into(), Av::Long(1))])));
    assert_eq!(get(&env, "op"), &Av::String("c".into()));
    assert_eq!(field(&env, "after", "amount").0, 1);
    assert_eq!(decimal(field(&env, "after", "amount").1, 2), "37.50");
    assert_eq!(field(&env, "after", "due"), (1, &Av::Date(20_789)));
    assert_eq!(
        field(&env, "after", "updated_at"),
        (1, &Av::TimestampMicros(1_767_254_400_250_000))
    );
    assert_eq!(
        get(get(&env, "source"), "connector"),
        &Av::String("syncbridge".into())
    );

    // UPDATE that did not touch the TOASTed `notes`: the marker, not NULL, not a string.
    let (env, _) = run(Op::Update, None, Some(demo_row("1", Value::UnchangedToast)));
    let (b, v) = field(&env, "after", "notes");
    assert_eq!((b, v), (2, &Av::Enum(0, UNCHANGED_SYMBOL.into())));
    // An UPDATE that set it to NULL, and one that set it to the empty string.
    let (env, _) = run(Op::Update, None, Some(demo_row("1", Value::Null)));
    assert_eq!(field(&env, "after", "notes"), (0, &Av::Null));
    let (env, _) = run(Op::Update, None, Some(demo_row("1", t(""))));
    assert_eq!(
        field(&env, "after", "notes"),
        (1, &Av::String(String::new()))
    );

    // DELETE under REPLICA IDENTITY DEFAULT: key columns only.
    let mut old: Row = vec![Value::Null; 8];
    old[0] = t("1");
    let (env, key) = run(Op::Delete, Some(old), None);
    assert_eq!(key, Some(Av::Record(vec![("id".into(), Av::Long(1))])));
    assert_eq!(field(&env, "before", "title"), (0, &Av::Null));
    assert_eq!(get(&env, "after"), &Av::Union(0, Box::new(Av::Null)));

    let (env, key) = run(Op::Truncate, None, None);
    assert_eq!((get(&env, "op"), key), (&Av::String("t".into()), None));

    let (env, _) = run(Op::Read, None, Some(demo_row("2", t("x"))));
    assert_eq!(
        get(get(&env, "source"), "snapshot"),
        &Av::String("true".into())
    );
}

#[test]
fn every_type_decodes_losslessly() {
    let resolver = SchemaResolver::from_dir(schemas_dir()).unwrap();
    let rel = all_types();
    let e = Encoder::new("example")
        .encode(&event(
            &rel,
            "example",
            Op::Create,
            None,
            Some(all_types_row()),
        ))
        .unwrap();
    let key = decode(&e.key, &resolver).unwrap();
    assert_eq!(
        key,
        Av::Record(vec![
            (
                "id".into(),
                Av::Uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".parse().unwrap())
            ),
            ("seq".into(), Av::Long(7)),
        ])
    );
    let env = decode(&e.value, &resolver).unwrap();
    let f = |name| field(&env, "after", name);
    assert_eq!(f("c_int2"), (1, &Av::Int(-32768)));
    assert_eq!(f("c_int4"), (1, &Av::Int(i32::MAX)));
    assert_eq!(decimal(f("c_numeric").1, 4), "-1234567890123456.7891");
    assert_eq!(f("c_numeric_free"), (1, &Av::String("NaN".into())));
    assert_eq!(f("c_float4"), (1, &Av::Float(f32::MAX)));
    assert_eq!(f("c_float8"), (1, &Av::Double(f64::NEG_INFINITY)));
    assert_eq!(f("c_bool"), (1, &Av::Boolean(true)));
    assert_eq!(f("c_varchar"), (1, &Av::String(String::new())));
    assert_eq!(f("c_char"), (1, &Av::String("ab ".into())));
    assert_eq!(
        f("c_date"),
        (2, &Av::String("infinity".into())),
        "string branch"
    );
    assert_eq!(f("c_time"), (1, &Av::TimeMicros(86_400_000_000)));
    assert_eq!(
        f("c_ts"),
        (1, &Av::LocalTimestampMicros(-63_517_780_800_000_000))
    );
    assert_eq!(
        f("c_tstz"),
        (1, &Av::TimestampMicros(1_719_826_199_999_999))
    );
    assert_eq!(f("c_json"), (1, &Av::String(r#"{"a":1}"#.into())));
    assert_eq!(f("c_bytea"), (1, &Av::Bytes(vec![0xde, 0xad, 0xbe, 0xef])));
    assert_eq!(f("c_enum"), (1, &Av::String("happy".into())));
    let some = |v| Av::Union(1, Box::new(v));
    let null = Av::Union(0, Box::new(Av::Null));
    assert_eq!(
        f("c_int_array"),
        (
            1,
            &Av::Array(vec![some(Av::Int(1)), null.clone(), some(Av::Int(-3))])
        )
    );
    assert_eq!(
        f("c_text_array"),
        (
            1,
            &Av::Array(vec![
                some(Av::String("x,y".into())),
                some(Av::String("say \"hi\"".into())),
                null,
                some(Av::String("NULL".into())),
            ])
        )
    );
    assert_eq!(f("c_range"), (1, &Av::String("[1,5)".into())));
    assert_eq!(f("Odd_Name_"), (0, &Av::Null));
}

/// A table created after `schemas/` was committed, and its later ADD/DROP COLUMN versions,
/// decode once the schemas-topic records are known.
#[test]
fn new_tables_and_versions_resolve_through_the_schemas_topic() {
    let mut resolver = SchemaResolver::from_dir(schemas_dir()).unwrap();
    let v1 = Arc::new(Relation {
        oid: 17_000,
        schema: "sales".into(),
        name: "invoices".into(),
        columns: vec![
            column("no", 23, "integer", -1, true, false),
            column(
                "total",
                1700,
                "numeric(10,2)",
                numeric_typmod(10, 2),
                false,
                true,
            ),
        ],
        replica_identity: 'd',
        version: 1,
    });
    let mut v2 = (*v1).clone();
    v2.version = 2;
    v2.columns.push(column(
        "paid_at",
        1184,
        "timestamp with time zone",
        -1,
        false,
        true,
    ));
    let v2 = Arc::new(v2);
    let mut v3 = (*v2).clone();
    v3.version = 3;
    v3.columns.remove(1);
    let v3 = Arc::new(v3);

    let mut enc = Encoder::new("demo");
    let e1 = enc
        .encode(&event(
            &v1,
            "demo",
            Op::Create,
            None,
            Some(vec![t("1"), t("10.00")]),
        ))
        .unwrap();
    assert!(matches!(
        decode(&e1.value, &resolver),
        Err(DecodeError::UnknownFingerprint(_))
    ));
    let e2 = enc
        .encode(&event(
            &v2,
            "demo",
            Op::Create,
            None,
            Some(vec![t("2"), t("20.00"), t("2026-01-01 00:00:00+00")]),
        ))
        .unwrap();
    let e3 = enc
        .encode(&event(
            &v3,
            "demo",
            Op::Update,
            None,
            Some(vec![t("2"), t("2026-01-02 00:00:00+00")]),
        ))
        .unwrap();
    assert_eq!(e1.new_schemas.len(), 2, "key + envelope");
    assert_eq!(e2.new_schemas.len(), 1, "same key, new envelope");
    assert_eq!(e3.new_schemas.len(), 1);
    for (k, v) in e1
        .new_schemas
        .iter()
        .chain(&e2.new_schemas)
        .chain(&e3.new_schemas)
    {
        resolver.add_topic_record(k, v).unwrap();
    }
    let d1 = decode(&e1.value, &resolver).unwrap();
    let d2 = decode(&e2.value, &resolver).unwrap();
    let d3 = decode(&e3.value, &resolver).unwrap();
    assert_eq!(decimal(field(&d1, "after", "total").1, 2), "10.00");
    assert_eq!(
        field(&d2, "after", "paid_at"),
        (1, &Av::TimestampMicros(1_767_225_600_000_000))
    );
    assert_eq!(
        field(&d3, "after", "paid_at"),
        (1, &Av::TimestampMicros(1_767_312_000_000_000))
    );
    assert!(
        matches!(get(&d3, "after"), Av::Union(1, r) if matches!(&**r, Av::Record(f) if f.len() == 2))
    );
    assert_eq!(
        decode(&e3.key, &resolver).unwrap(),
        Av::Record(vec![("no".into(), Av::Int(2))])
    );
}
