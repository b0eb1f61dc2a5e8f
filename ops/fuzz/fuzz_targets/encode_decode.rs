//! Fuzzes the change-event encoder with arbitrary column texts (and NULL / unchanged-TOAST
//! values) for every mapped type, checks that whatever it encodes decodes with the schemas it
//! published, and feeds the raw input to the decoder. Neither may panic.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

// The event format's own sources, at the same module path as in the service crate.
#[allow(dead_code, unused_imports)]
#[path = "../../../src/event/mod.rs"]
mod event;

use event::change::{ChangeEvent, Column, Op, Relation, Source, TypeKind, Value};
use event::{Encoder, SchemaResolver, decode};

fn col(name: &str, oid: u32, typmod: i32, kind: TypeKind, key: bool) -> Column {
    Column {
        name: name.into(),
        type_oid: oid,
        type_name: format!("t{oid}"),
        type_modifier: typmod,
        kind,
        is_key: key,
        nullable: !key,
    }
}

fn relation() -> Arc<Relation> {
    let base = TypeKind::Base;
    let arr = |oid| TypeKind::Array {
        element_oid: oid,
        element: Box::new(TypeKind::Base),
    };
    Arc::new(Relation {
        oid: 1,
        schema: "public".into(),
        name: "fuzz".into(),
        columns: vec![
            col("k", 25, -1, base.clone(), true),
            col("i2", 21, -1, base.clone(), false),
            col("i8", 20, -1, base.clone(), false),
            col("n", 1700, ((12 << 16) | 2) + 4, base.clone(), false),
            col(
                "nneg",
                1700,
                ((2 << 16) | (-3i32 & 0x7ff)) + 4,
                base.clone(),
                false,
            ),
            col("nfree", 1700, -1, base.clone(), false),
            col("f4", 700, -1, base.clone(), false),
            col("f8", 701, -1, base.clone(), false),
            col("b", 16, -1, base.clone(), false),
            col("u", 2950, -1, base.clone(), false),
            col("by", 17, -1, base.clone(), false),
            col("d", 1082, -1, base.clone(), false),
            col("t", 1083, -1, base.clone(), false),
            col("ts", 1114, -1, base.clone(), false),
            col("tz", 1184, -1, base.clone(), false),
            col("j", 3802, -1, base.clone(), false),
            col("e", 9, -1, TypeKind::Enum, false),
            col("ai", 1007, -1, arr(23), false),
            col("ad", 1182, -1, arr(1082), false),
            col("an", 1231, ((5 << 16) | 1) + 4, arr(1700), false),
            col("o", 3904, -1, TypeKind::Other, false),
        ],
        replica_identity: 'd',
        version: 1,
    })
}

thread_local! {
    // Built once per process: the encoder caches the relation's schemas, the resolver holds them.
    static STATE: RefCell<(Arc<Relation>, Encoder, SchemaResolver)> =
        RefCell::new((relation(), Encoder::new("fuzz"), SchemaResolver::new()));
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes straight into the decoder.
    let _ = decode(data, &SchemaResolver::new());
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    STATE.with_borrow_mut(|(rel, enc, resolver)| {
        let n = rel.columns.len();
        // Columns are separated by 0xFF; a leading 0xFE means NULL, 0xFD unchanged TOAST.
        let mut row: Vec<Value> = rest
            .split(|&b| b == 0xFF)
            .map(|part| match part.first() {
                Some(0xFE) => Value::Null,
                Some(0xFD) => Value::UnchangedToast,
                _ => Value::Text(String::from_utf8_lossy(part).into_owned()),
            })
            .collect();
        row.resize(n, Value::Null);
        let op =
            [Op::Create, Op::Update, Op::Delete, Op::Read, Op::Truncate][usize::from(selector % 5)];
        let (before, after) = match op {
            Op::Delete => (Some(row), None),
            Op::Truncate => (None, None),
            _ => (
                if selector & 0x80 != 0 {
                    Some(row.clone())
                } else {
                    None
                },
                Some(row),
            ),
        };
        let event = ChangeEvent {
            relation: rel.clone(),
            op,
            before,
            after,
            source: Source {
                pipeline: "fuzz".into(),
                db: "db".into(),
                lsn: u64::from(selector) << 40,
                tx_id: None,
                commit_ts_ms: 0,
                origin: None,
                snapshot: false,
                connector: event::change::CONNECTOR_WAL,
            },
            ts_ms: 0,
        };
        if let Ok(e) = enc.encode(&event) {
            for (k, v) in &e.new_schemas {
                resolver
                    .add_topic_record(k, v)
                    .expect("published schema must load");
            }
            decode(&e.value, resolver).expect("encoded value must decode with its schema");
            if !e.key.is_empty() {
                decode(&e.key, resolver).expect("encoded key must decode with its schema");
            }
            // Arbitrary body behind a known fingerprint.
            let mut framed = e.value[..10].to_vec();
            framed.extend_from_slice(rest);
            let _ = decode(&framed, resolver);
        }
    });
});
