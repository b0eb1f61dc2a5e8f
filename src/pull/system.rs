//! SharePoint's system fields (`ID`, `Created`, `Modified`, `Author`, `Editor`) mapped into
//! columns (`direction: pull_only`): filled from the item the push just created, so a row knows
//! its item's id and times before anyone edits it. Later list edits bring them along with the
//! fields they change ([`super::upsert`]).
//!
//! The row is written through the applier's replication origin, so capture marks the change
//! and the push side finds nothing to send (system fields are never pushed): no echo write.
//! Runs after the flush's ledger commit; a crash before it leaves the columns to the next edit
//! of the item. A person field whose user has no email (the app account that made the item)
//! leaves its column as it is.

use tracing::warn;

use super::values::key_values;
use super::{RowChange, RowChangeKind};
use crate::config::SYSTEM_FIELDS;
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::convert;
use crate::process::processor::Processor;

impl<L: EventLog + 'static> Processor<L> {
    /// Writes the system fields of the items this flush created into their rows.
    pub(crate) async fn fill_system_fields(&mut self) -> Result<(), ProcessError> {
        for (ti, sk, fields) in std::mem::take(&mut self.system_fill) {
            let mappings: Vec<_> = self.tables[ti]
                .entry
                .fields
                .iter()
                .filter(|f| SYSTEM_FIELDS.contains(&f.field.as_str()))
                .cloned()
                .collect();
            let mut set = Vec::new();
            for f in &mappings {
                let canon = convert::canonical_from_item(&fields, f);
                if let Ok(text) = self.pulled_text(f, &canon).await? {
                    set.push((f.column.clone(), text));
                }
            }
            if set.is_empty() {
                continue;
            }
            let change = RowChange {
                table: self.table_name(ti),
                key: key_values(&self.facts[ti].key_columns, &sk),
                kind: RowChangeKind::Update { set },
            };
            if let Err(e) = self.apply(change).await? {
                warn!(table = %self.tables[ti].table, key = %sk, error = %e,
                    "the new item's system fields were not written to its row");
            }
        }
        Ok(())
    }
}
