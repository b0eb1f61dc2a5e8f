//! Schema changes while streaming: a table whose change events no longer carry a mapped column
//! (`DROP COLUMN`, `RENAME COLUMN`), or carry it with a type its field cannot hold
//! (`ALTER COLUMN … TYPE`), is paused; the other tables keep flowing.
//!
//! # Where the pause lives, and why here
//! Capture writes every event to the log whatever the table's shape (each relation version has
//! its own Avro schema, see [`crate::event::schema`]) and acknowledges the slot once they are
//! durable there, so it never has to hold WAL back for a mapping problem: the log keeps the
//! events, and the slot does not grow while an operator fixes the mapping. The processor is the
//! first stage that knows the mapping, and each table has its own topic, so it can stop one
//! table alone: it leaves that table's records unprocessed and commits none of that topic's
//! partitions at or past the first of them. After the fix (a config reload restarts the
//! pipeline's processor from its committed offsets), every held event is read again and
//! processed once, with the new mapping.
//!
//! # Contract
//! - The verdict is made per writer schema (fingerprint), before the record touches the pending
//!   set: a record that does not fit is never projected, so no field is written empty and no item
//!   loses a value. Holding is per partition (a row's changes stay in one partition, in order):
//!   from a partition's first record that does not fit, that partition of the table is held;
//!   records of the old shape in its other partitions are still written until each reaches the
//!   change, so after the fix every held record has the new shape. Records of the table that
//!   were pending before the change still flush (they carry the old, complete shape).
//! - A column added to the table but not mapped changes nothing (it is not in the verdict). A
//!   mapped column an event lacks while the table has it now (asked of the catalog, once per
//!   writer schema) is not a drop: the event is older than the column (added, then mapped on a
//!   reload, whose re-read of the table fills it in), so the event is written without that field,
//!   which keeps its value.
//! - A type change passes while the field can still take the new type's values
//!   ([`crate::process::convert::converts`], judged by the values' Avro type, so a domain over a
//!   number is a number; the rule `validate --db` reports as errors): `int` → `bigint` or
//!   `numeric` for a number field, and also → `text` (each value is parsed, as text columns in
//!   number fields always were). `int` → `boolean`, `date` or an array for a number field pauses.
//! - A pause is told three ways: an ERROR log line, the gauge `syncbridge_table_paused` (with the
//!   counter `syncbridge_table_pauses_total`) and `/ready` (stage `table:<schema.table>`, with the
//!   reason). Each names the column, the table and the mapping's `file:line` when the pipeline
//!   was started from a file.
//! - The pause is not remembered: a processor that starts (after a reload or a restart) reads
//!   the held records again and pauses again if the mapping still does not fit. Its first record
//!   of the table that fits clears the `/ready` stage and the gauge.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use apache_avro::Schema;
use tracing::{error, info, warn};

use super::{LastEvent, Processor};
use crate::capture::catalog::qualified_ident;
use crate::config::{FieldMapping, FieldType};
use crate::control::Readiness;
use crate::log::EventLog;
use crate::process::convert::{ValueKind, accepted_types, converts};
use crate::process::row::{ColumnShape, value_columns};
use crate::telemetry::metrics as m;

/// `/ready` stage of a paused table.
fn stage(table: &str) -> String {
    format!("table:{table}")
}

/// A paused table: per partition that reached the change, its first record held (the reason is
/// in `/ready` and the log).
#[derive(Debug)]
struct TablePause {
    floor: BTreeMap<(String, i32), i64>,
}

/// What the processor knows about its tables' shapes.
#[derive(Debug, Default)]
pub(crate) struct SchemaState {
    /// Per writer-schema fingerprint: the mapping's problems with it (empty: it fits).
    verdicts: HashMap<u64, Vec<String>>,
    /// Paused tables, by index.
    paused: BTreeMap<usize, TablePause>,
    /// Tables whose stage this processor has cleared (a fitting record was seen).
    cleared: HashSet<usize>,
    /// Where pauses are shown, and the pipeline's file (for the mapping's line).
    readiness: Option<Readiness>,
    file: Option<PathBuf>,
}

impl SchemaState {
    /// The lowest held offset per partition of every paused table (the offset commit stops there).
    pub(crate) fn held(&self) -> impl Iterator<Item = ((String, i32), i64)> + '_ {
        self.paused
            .values()
            .flat_map(|p| p.floor.iter().map(|(tp, o)| (tp.clone(), *o)))
    }
}

/// One mapped column a row image does not fit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Misfit {
    pub(crate) column: String,
    /// The image does not carry the column at all (else: its type does not fit).
    pub(crate) missing: bool,
    pub(crate) why: String,
}

/// Every problem the mapping `fields` has with a row image of `columns`.
pub(crate) fn mapping_problems(fields: &[FieldMapping], columns: &[ColumnShape]) -> Vec<Misfit> {
    let mut out = Vec::new();
    for f in fields {
        let (missing, why) = match columns.iter().find(|c| c.column == f.column) {
            None => (
                true,
                format!(
                    "mapped column {:?} (field {}) is no longer in the table (dropped or renamed)",
                    f.column, f.field
                ),
            ),
            Some(c) if !column_fits(f.field_type, c) => (
                false,
                format!(
                    "mapped column {:?} is now {}: a {} field (field {}) cannot hold it ({})",
                    f.column,
                    c.pg_type.as_deref().unwrap_or("of another type"),
                    f.field_type,
                    f.field,
                    accepted_types(f.field_type)
                ),
            ),
            Some(_) => continue,
        };
        out.push(Misfit {
            column: f.column.clone(),
            missing,
            why,
        });
    }
    out
}

/// Whether field type `t` can take the values of column `c` ([`converts`], by the values' Avro
/// type: what the converter is given).
fn column_fits(t: FieldType, c: &ColumnShape) -> bool {
    use ValueKind as K;
    let kind = match &c.avro {
        Schema::Int | Schema::Long => K::Integer,
        Schema::Float | Schema::Double | Schema::Decimal(_) | Schema::BigDecimal => K::Fractional,
        Schema::Boolean => K::Boolean,
        Schema::Date => K::Date,
        Schema::TimestampMicros
        | Schema::TimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampMillis => K::Timestamp,
        Schema::String | Schema::Uuid(_) | Schema::Enum(_) => K::Text,
        _ => K::Other,
    };
    converts(t, kind)
}

impl<L: EventLog + 'static> Processor<L> {
    /// Shows table pauses in `readiness` and names mapping lines from `file` (the pipeline's
    /// file, when it was started from one).
    pub fn report_schema_pauses(&mut self, readiness: Readiness, file: Option<PathBuf>) {
        self.schema.readiness = Some(readiness);
        self.schema.file = file;
    }

    /// Whether the record at `last` of table `ti` (written with schema `fp`) must be held: its
    /// partition of the table is held already, or its shape does not fit the mapping (which
    /// holds the partition from here, and pauses the table if it was not).
    pub(crate) async fn hold_for_schema(
        &mut self,
        ti: usize,
        fp: u64,
        schema: Option<&Schema>,
        last: &LastEvent,
    ) -> bool {
        let tp = (last.topic.clone(), last.partition);
        if self
            .schema
            .paused
            .get(&ti)
            .is_some_and(|p| p.floor.contains_key(&tp))
        {
            return true;
        }
        let problems = match self.schema.verdicts.get(&fp) {
            Some(p) => p.clone(),
            None => {
                let p = self.verdict(ti, schema).await;
                self.schema.verdicts.insert(fp, p.clone());
                p
            }
        };
        if problems.is_empty() {
            // Another partition's records may still be of the old shape: they fit and are
            // written (they precede the change for their rows).
            if !self.schema.paused.contains_key(&ti) {
                self.schema_fits(ti);
            }
            return false;
        }
        match self.schema.paused.get_mut(&ti) {
            Some(p) => {
                p.floor.insert(tp, last.offset);
            }
            None => self.pause_table(ti, problems, last),
        }
        true
    }

    /// The problems of table `ti`'s mapping with writer schema `schema`, one line each. A mapped
    /// column the event lacks but the table has now is not one: the event is older than the
    /// column (added, then mapped on a reload), and its field is left as it is.
    async fn verdict(&self, ti: usize, schema: Option<&Schema>) -> Vec<String> {
        // An envelope without columns was dead-lettered by the decoder already.
        let Some(columns) = schema.and_then(|s| value_columns(s).ok()) else {
            return Vec::new();
        };
        let mut misfits = mapping_problems(&self.tables[ti].entry.fields, &columns);
        if misfits.iter().any(|m| m.missing) {
            match self.live_columns(ti).await {
                Ok(live) => misfits.retain(|m| !(m.missing && live.contains(&m.column))),
                Err(e) => warn!(table = %self.tables[ti].table,
                    "cannot read the table's columns, so a mapped column missing from its events counts as dropped: {e}"),
            }
        }
        misfits
            .into_iter()
            .map(|m| format!("{}; mapping at {}", m.why, self.mapping_at(ti, &m.column)))
            .collect()
    }

    /// The columns table `ti` has now, from the source database's catalog.
    async fn live_columns(&self, ti: usize) -> Result<HashSet<String>, String> {
        let t = &self.tables[ti].entry.table;
        let (client, conn) = crate::pg::connect_source(&self.cfg.pipeline.source)
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) \
                 AND attnum > 0 AND NOT attisdropped",
                &[&qualified_ident(&t.schema, &t.name)],
            )
            .await;
        driver.abort();
        Ok(rows
            .map_err(|e| e.to_string())?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn pause_table(&mut self, ti: usize, problems: Vec<String>, last: &LastEvent) {
        let table = self.tables[ti].table.clone();
        let pipeline = self.cfg.pipeline.name.clone();
        let at = format!("{}/{}@{}", last.topic, last.partition, last.offset);
        let reason = format!(
            "table {table} paused at {at}: {}. Fix the mapping (or the table), then reload: the \
             held changes are synced then",
            problems.join("; ")
        );
        error!(pipeline = %pipeline, table = %table, at = %at, "{reason}");
        metrics::gauge!(m::TABLE_PAUSED, "pipeline" => pipeline.clone(), "table" => table.clone())
            .set(1.0);
        metrics::counter!(m::TABLE_PAUSES_TOTAL, "pipeline" => pipeline.clone(), "table" => table.clone())
            .increment(1);
        if let Some(r) = &self.schema.readiness {
            r.set_not_ready(&pipeline, &stage(&table), reason);
        }
        let floor = BTreeMap::from([((last.topic.clone(), last.partition), last.offset)]);
        self.schema.paused.insert(ti, TablePause { floor });
        self.schema.cleared.remove(&ti);
    }

    /// A record of `ti` fits: clears a pause a previous processor showed (once per processor).
    fn schema_fits(&mut self, ti: usize) {
        if !self.schema.cleared.insert(ti) {
            return;
        }
        let table = &self.tables[ti].table;
        let pipeline = &self.cfg.pipeline.name;
        if let Some(r) = &self.schema.readiness
            && r.remove(pipeline, &stage(table))
        {
            info!(pipeline = %pipeline, table = %table, "table resumed: its changes fit the mapping again");
        }
        metrics::gauge!(m::TABLE_PAUSED, "pipeline" => pipeline.clone(), "table" => table.clone())
            .set(0.0);
    }

    /// `file:line` of table `ti`'s mapping of `column`, read from the pipeline's file as it is
    /// now; the entry's name when there is no file (or it no longer parses).
    fn mapping_at(&self, ti: usize, column: &str) -> String {
        let table = &self.tables[ti].table;
        let fallback = format!("sync entry `table: {table}`, `fields: {column}`");
        let Some(file) = &self.schema.file else {
            return fallback;
        };
        let Ok(located) = crate::config::load_files_located(std::slice::from_ref(file)) else {
            return fallback;
        };
        located
            .iter()
            .find(|p| p.config.name == self.cfg.pipeline.name)
            .and_then(|p| {
                let i = p
                    .config
                    .sync
                    .iter()
                    .position(|e| e.table.to_string() == *table)?;
                let (line, col) = p.mapping_at(i, column);
                Some(format!("{}:{line}:{col}", p.file))
            })
            .unwrap_or(fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(column: &str, t: FieldType) -> FieldMapping {
        FieldMapping::for_test(column, t)
    }

    fn col(column: &str, pg: &str, avro: Schema) -> ColumnShape {
        ColumnShape {
            column: column.into(),
            pg_type: Some(pg.into()),
            avro,
        }
    }

    #[test]
    fn a_missing_mapped_column_is_a_problem_an_unmapped_new_one_is_not() {
        let fields = [
            field("id", FieldType::Number),
            field("price", FieldType::Number),
        ];
        let columns = [
            col("id", "integer", Schema::Int),
            col("note", "text", Schema::String),
        ];
        let p = mapping_problems(&fields, &columns);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].column.as_str(), p[0].missing), ("price", true));
        assert!(p[0].why.contains("\"price\"") && p[0].why.contains("dropped or renamed"));
        let with_price = [
            col("id", "integer", Schema::Int),
            col("price", "numeric(10,2)", Schema::String),
            col("note", "text", Schema::String),
        ];
        assert!(mapping_problems(&fields, &with_price).is_empty());
    }

    #[test]
    fn a_type_change_passes_while_the_field_holds_it() {
        let fields = [field("qty", FieldType::Number)];
        for (pg, avro, ok) in [
            ("bigint", Schema::Long, true),
            ("double precision", Schema::Double, true),
            // A domain over integer: its name is unknown, its values are numbers.
            ("positive", Schema::Int, true),
            // Text is parsed value by value, as text columns in number fields always were.
            ("text", Schema::String, true),
            ("boolean", Schema::Boolean, false),
            ("date", Schema::Date, false),
            (
                "integer[]",
                Schema::Array(apache_avro::schema::ArraySchema {
                    items: Box::new(Schema::Int),
                    attributes: Default::default(),
                }),
                false,
            ),
        ] {
            let p = mapping_problems(&fields, &[col("qty", pg, avro)]);
            assert_eq!(p.is_empty(), ok, "{pg}: {p:?}");
            if !ok {
                assert!(!p[0].missing && p[0].why.contains(pg), "{p:?}");
            }
        }
        // A text field holds anything.
        let text = [field("qty", FieldType::Text)];
        assert!(mapping_problems(&text, &[col("qty", "jsonb", Schema::String)]).is_empty());
    }
}
