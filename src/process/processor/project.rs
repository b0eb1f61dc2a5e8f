//! Mapping a row to list fields: a row's column values become the Graph fields of its
//! projection (via [`convert`])), resolving persons (by email, cached)
//! and lookups (the referenced row's item, from the ledger), plus the projection's hash and the
//! field-level diff the ledger check uses.
//!
//! Invariant: a projection depends on the row, the ledger (lookup targets' items, the values of
//! unchanged TOAST columns) and the site's user ids, never on the item's current content, so
//! the same row state hashes the same and an unchanged row costs no write. A lookup whose
//! target row has no item yet is deferred, never written as empty.

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};

use super::Processor;
use crate::config::{Direction, FieldMapping, FieldType, SYSTEM_FIELDS};
use crate::graph::GraphError;
use crate::log::EventLog;
use crate::process::convert::{self, Resolved, Unmappable};
use crate::process::ledger::{self, Entry};
use crate::process::row::{Cell, Row};
use crate::telemetry::metrics as m;

/// Why a row could not be mapped now.
pub(crate) enum ProjectError {
    Unmappable(Unmappable),
    Defer(String),
    Graph(GraphError),
}

impl<L: EventLog + 'static> Processor<L> {
    /// Maps a row to its projection (Graph field → JSON), resolving persons and lookups.
    pub(crate) async fn project(
        &mut self,
        ti: usize,
        row: &Row,
        entry: &Entry,
    ) -> Result<BTreeMap<String, Json>, ProjectError> {
        let mut out = BTreeMap::new();
        let fields = self.tables[ti].push_fields.clone();
        for f in &fields {
            let Some(cell) = row.get(&f.column) else {
                continue;
            };
            if matches!(cell, Cell::Unchanged) {
                for (k, v) in &entry.projection {
                    if k == &f.field
                        || k.starts_with(&format!("{}@", f.field))
                        || k == &format!("{}LookupId", f.field)
                    {
                        out.insert(k.clone(), v.clone());
                    }
                }
                continue;
            }
            let mut resolved = Resolved::default();
            if !matches!(cell, Cell::Null) {
                match f.field_type {
                    FieldType::Person => {
                        let email = cell.to_text().unwrap_or_default();
                        resolved.person = self.person(&email).await.map_err(ProjectError::Graph)?;
                    }
                    FieldType::Lookup => {
                        resolved.lookup_item = self.lookup_item(f, cell)?;
                        if resolved.lookup_item.is_none() {
                            return Err(ProjectError::Defer(format!(
                                "column {} → field {}: the referenced row {:?} has no item in list {:?}",
                                f.column,
                                f.field,
                                cell.to_text().unwrap_or_default(),
                                f.lookup_list.as_deref().unwrap_or("?")
                            )));
                        }
                    }
                    _ => {}
                }
            }
            for (k, v) in
                convert::to_fields(cell, f, &resolved).map_err(ProjectError::Unmappable)?
            {
                out.insert(k, v);
            }
        }
        Ok(out)
    }

    /// Counts the row's `pull_only` values that differ from the list's (the ledger's record of
    /// the item) and so are held back: they never leave the database. A person or lookup value
    /// (its id is not resolved for this) counts whenever it is set.
    pub(crate) fn count_held_pull_only(&self, ti: usize, row: &Row, entry: &Entry) {
        let mut held = 0u64;
        for f in &self.tables[ti].entry.fields {
            if f.direction != Direction::PullOnly || SYSTEM_FIELDS.contains(&f.field.as_str()) {
                continue;
            }
            let Some(cell) = row.get(&f.column).filter(|c| !matches!(c, Cell::Unchanged)) else {
                continue;
            };
            let Ok(values) = convert::to_fields(cell, f, &Resolved::default()) else {
                held += u64::from(!matches!(cell, Cell::Null));
                continue;
            };
            let differs = values.iter().any(|(k, v)| {
                !k.ends_with("@odata.type") && entry.projection.get(k).unwrap_or(&Json::Null) != v
            });
            held += u64::from(differs);
        }
        if held > 0 {
            metrics::counter!(m::DIRECTION_HELD_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "direction" => "pull_only")
                .increment(held);
        }
    }

    /// The lookup id of the user with this email (cached per processor; `None`: no such user).
    pub(crate) async fn person(&mut self, email: &str) -> Result<Option<u64>, GraphError> {
        let norm = email.trim().to_ascii_lowercase();
        if let Some(v) = self.people.get(&norm) {
            return Ok(*v);
        }
        let id = self
            .client
            .find_user_lookup_id(&self.targets.site_id, &norm)
            .await?;
        self.people.insert(norm, id);
        Ok(id)
    }

    /// The item id of the row a lookup cell points to, when that row has an item in the
    /// lookup's list.
    pub(crate) fn lookup_item(
        &self,
        f: &FieldMapping,
        cell: &Cell,
    ) -> Result<Option<String>, ProjectError> {
        let list = f.lookup_list.as_deref().unwrap_or_default();
        let Some(list_id) = self.targets.list_id(list) else {
            return Ok(None);
        };
        let Some(target) = self
            .tables
            .iter()
            .find(|t| t.entry.lists().any(|l| l == list))
        else {
            return Ok(None);
        };
        let fk = cell.to_text().unwrap_or_default();
        let entry = self
            .ledger
            .get(&ledger::key(&target.table, &fk))
            .map_err(|e| ProjectError::Defer(e.to_string()))?;
        Ok(entry
            .and_then(|e| e.item)
            .filter(|i| i.list_id == list_id)
            .map(|i| i.item_id))
    }
}

/// Hex SHA-256 (first 16 bytes) of the canonical JSON of a projection (keys sorted).
pub(crate) fn hash_projection(p: &BTreeMap<String, Json>) -> String {
    let bytes = serde_json::to_vec(p).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

/// The fields of `new` that differ from `old`, with their `@odata.type` annotations.
pub(crate) fn diff(
    old: &BTreeMap<String, Json>,
    new: &BTreeMap<String, Json>,
) -> Map<String, Json> {
    let mut out = Map::new();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.insert(k.clone(), v.clone());
            let ann = format!("{k}@odata.type");
            if let Some(a) = new.get(&ann) {
                out.insert(ann, a.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_sends_changed_fields_with_annotations() {
        let old: BTreeMap<String, Json> = [
            ("A".to_string(), json!(1)),
            ("T".to_string(), json!(["a"])),
            ("T@odata.type".to_string(), json!("Collection(Edm.String)")),
        ]
        .into();
        let mut new = old.clone();
        new.insert("T".into(), json!(["a", "b"]));
        let d = diff(&old, &new);
        assert_eq!(d.len(), 2);
        assert_eq!(d["T@odata.type"], json!("Collection(Edm.String)"));
        assert!(diff(&old, &old).is_empty());
        assert_ne!(hash_projection(&old), hash_projection(&new));
    }
}
