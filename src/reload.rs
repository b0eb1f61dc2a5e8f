//! Hot reload: `SIGHUP` or `syncbridge run --watch` re-reads the pipeline files while the process
//! runs (the runtime applies the plan, see `crate::runtime`).
//!
//! Invariants:
//! - Parse, validate, compare, then act: a file with a problem, or a change that cannot apply
//!   live, changes nothing; the reason goes to the log and `syncbridge_config_reloads_total`
//!   counts the outcome.
//! - Refused (they name where the pipeline's durable state lives, or the process's own
//!   settings): `source.url`, `log:` (kind, path, brokers, topic prefix, schema registry), the
//!   pipeline names (they name slot, publication and topics), a synced table's `key` (SyncKeys and
//!   record keys are built from it), removing a synced table, `control.listen`/`control.tokens`.
//! - Everything else applies by draining the changed pipeline alone, in order, as shutdown does,
//!   and starting it again in the same process with the new config: the slot, log offsets and
//!   ledger are durable, so nothing is lost or written twice. A table new to the pipeline is added
//!   to its publication between the drain and the start (so the old capture never reads it);
//!   capture snapshots a table that has no snapshot record at start.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::capture::catalog::{qualified_ident, quote_ident};
use crate::config::{self, ConfigReport, PipelineConfig, SyncEntry, TableName};
use crate::control::meta::runs::{RunAbout, RunKind, record_finished};
use crate::log::EventLog;

/// How often `--watch` looks at the files: a second is quick for a person saving a file and
/// costs a read of a few small files.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the pipeline files have problems, nothing changed:\n{0}")]
    Invalid(ConfigReport),
    #[error("refused, nothing changed (restart the process for these):\n  - {}", .0.join("\n  - "))]
    Refused(Vec<String>),
    /// Adding new tables to the publication failed (the old config is started again).
    #[error("cannot add {tables} to publication {publication}: {message}")]
    Publication {
        publication: String,
        tables: String,
        message: String,
        retryable: bool,
    },
}

impl ReloadError {
    /// A bad file or a refused change is not (the operator fixes the file, or restarts); a
    /// database that could not be reached for the publication is.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ReloadError::Publication {
                retryable: true,
                ..
            }
        )
    }

    /// The `outcome` label of `syncbridge_config_reloads_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ReloadError::Invalid(_) => "invalid",
            ReloadError::Refused(_) => "refused",
            ReloadError::Publication { .. } => "failed",
        }
    }
}

/// One pipeline to restart with a new config.
#[derive(Debug, Clone)]
pub struct PipelineChange {
    pub config: PipelineConfig,
    /// What changed, one phrase each (the `reload` run's detail).
    pub changed: Vec<String>,
    /// Tables new to the pipeline: added to its publication once it is drained.
    pub new_tables: Vec<TableName>,
}

/// Reads `files` again and compares them with the running `current` configs: the pipelines to
/// restart (none when nothing changed), or why nothing may change.
pub fn plan(
    files: &[PathBuf],
    current: &[PipelineConfig],
) -> Result<Vec<PipelineChange>, ReloadError> {
    let new = config::load_files(files).map_err(ReloadError::Invalid)?;
    compare(current, new)
}

/// [`plan`] without the files: `new` against `current`.
pub fn compare(
    current: &[PipelineConfig],
    new: Vec<PipelineConfig>,
) -> Result<Vec<PipelineChange>, ReloadError> {
    let names = |ps: &[PipelineConfig]| ps.iter().map(|p| p.name.clone()).collect::<BTreeSet<_>>();
    let (before, after) = (names(current), names(&new));
    if before != after {
        return Err(ReloadError::Refused(vec![format!(
            "the pipelines would change from {before:?} to {after:?}: a pipeline's name names its slot, publication and topics"
        )]));
    }
    let mut refused = Vec::new();
    let mut changes = Vec::new();
    for p in new {
        let old = current
            .iter()
            .find(|o| o.name == p.name)
            .expect("same names");
        match diff(old, &p) {
            Err(mut r) => refused.append(&mut r),
            Ok(changed) if changed.is_empty() => {}
            Ok(changed) => {
                let new_tables = p
                    .sync
                    .iter()
                    // Query sources are polled: nothing to add to the publication.
                    .filter(|e| e.query.is_none() && !old.sync.iter().any(|o| o.table == e.table))
                    .map(|e| e.table.clone())
                    .collect();
                changes.push(PipelineChange {
                    config: p,
                    changed,
                    new_tables,
                });
            }
        }
    }
    if refused.is_empty() {
        Ok(changes)
    } else {
        Err(ReloadError::Refused(refused))
    }
}

/// What changed from `old` to `new` of one pipeline, or every change that cannot apply live.
pub fn diff(old: &PipelineConfig, new: &PipelineConfig) -> Result<Vec<String>, Vec<String>> {
    let name = &new.name;
    let mut refused = Vec::new();
    if old.source != new.source {
        refused.push(format!(
            "{name}: source.url changed; the replication slot lives in the old database"
        ));
    }
    if old.log != new.log {
        refused.push(format!(
            "{name}: log changed; the topics and offsets live in the old log"
        ));
    }
    if old.control.listen != new.control.listen || old.control.tokens != new.control.tokens {
        refused.push(format!(
            "{name}: control.listen or control.tokens changed; the control plane is the process's"
        ));
    }
    for o in &old.sync {
        match new.sync.iter().find(|e| e.table == o.table) {
            None => refused.push(format!(
                "{name}: table {} removed; it stays in the publication and its items in the lists",
                o.table
            )),
            Some(e) if e.key != o.key => refused.push(format!(
                "{name}: table {}: key changed from {} to {}; SyncKeys and record keys are built from it",
                o.table,
                key_text(&o.key),
                key_text(&e.key)
            )),
            Some(_) => {}
        }
    }
    if !refused.is_empty() {
        return Err(refused);
    }
    let mut changed = Vec::new();
    for e in &new.sync {
        match old.sync.iter().find(|o| o.table == e.table) {
            None => changed.push(format!("table {} added (list {:?})", e.table, e.list)),
            Some(o) => entry_changes(o, e, &mut changed),
        }
    }
    let sections: [(&str, bool); 7] = [
        (
            "graph.ru_per_minute",
            old.graph.ru_per_minute != new.graph.ru_per_minute,
        ),
        (
            "graph (site, tenant, sign-in)",
            old.graph != new.graph && old.graph.ru_per_minute == new.graph.ru_per_minute,
        ),
        ("schedules", old.schedules != new.schedules),
        ("notify", old.notify != new.notify),
        ("drift", old.drift != new.drift),
        ("guard", old.guard != new.guard),
        (
            "labels or control (meta_url, audit_retention)",
            old.labels != new.labels || old.control != new.control,
        ),
    ];
    changed.extend(
        sections
            .iter()
            .filter(|(_, differs)| *differs)
            .map(|(what, _)| format!("{what} changed")),
    );
    Ok(changed)
}

fn key_text(key: &Option<Vec<String>>) -> String {
    key.as_ref()
        .map_or_else(|| "the primary key".to_string(), |k| format!("{k:?}"))
}

/// What changed in one sync entry (same table), appended to `out`.
fn entry_changes(old: &SyncEntry, new: &SyncEntry, out: &mut Vec<String>) {
    let t = &new.table;
    let fields = |e: &SyncEntry| {
        e.fields
            .iter()
            .map(|f| f.field.clone())
            .collect::<BTreeSet<_>>()
    };
    let (before, after) = (fields(old), fields(new));
    let added: Vec<_> = after.difference(&before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    if !added.is_empty() {
        out.push(format!("table {t}: fields added {added:?}"));
    }
    if !removed.is_empty() {
        out.push(format!("table {t}: fields removed {removed:?}"));
    }
    let kept_changed = new
        .fields
        .iter()
        .any(|f| old.fields.iter().any(|o| o.field == f.field && o != f));
    let parts = [
        ("fields changed", kept_changed),
        ("list", old.list != new.list),
        ("routes", old.routes != new.routes),
        ("pull", old.pull != new.pull),
        ("conflict", old.conflict != new.conflict),
        ("query or poll", old.query != new.query),
    ];
    out.extend(
        parts
            .iter()
            .filter(|(_, d)| *d)
            .map(|(what, _)| format!("table {t}: {what} changed")),
    );
}

/// Adds `tables` to `publication` in the source database of `p`, unless they are in it already
/// (capture refuses a configured table missing from an existing publication; a publication
/// that does not exist yet is created by capture with every table).
pub async fn add_to_publication(
    p: &PipelineConfig,
    publication: &str,
    tables: &[TableName],
) -> Result<(), ReloadError> {
    let names: Vec<String> = tables
        .iter()
        .map(|t| qualified_ident(&t.schema, &t.name))
        .collect();
    let fail = |message: String, retryable: bool| ReloadError::Publication {
        publication: publication.to_string(),
        tables: names.join(", "),
        message,
        retryable,
    };
    let (client, connection) = crate::pg::connect_source(&p.source)
        .await
        .map_err(|e| fail(e.to_string(), e.is_retryable()))?;
    let conn = tokio::spawn(connection);
    let db_err = |e: tokio_postgres::Error| fail(e.to_string(), e.as_db_error().is_none());
    let result = async {
        let published: Vec<(String, String)> = client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let exists = client
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
            .await
            .map_err(db_err)?
            .is_some();
        for (t, name) in tables.iter().zip(&names) {
            if !exists || published.contains(&(t.schema.clone(), t.name.clone())) {
                continue;
            }
            let sql = format!("ALTER PUBLICATION {} ADD TABLE {name}", quote_ident(publication));
            client.batch_execute(&sql).await.map_err(db_err)?;
            info!(pipeline = %p.name, %publication, table = %name, "reload: table added to the publication");
        }
        Ok(())
    }
    .await;
    drop(client);
    let _ = conn.await;
    result
}

/// Records a finished `reload` run of `pipeline`: `by` the trigger, `detail` what changed, failed
/// with `failure` when the new config could not start.
pub async fn record_run<L: EventLog>(
    log: Arc<L>,
    runs_topic: String,
    pipeline: &str,
    trigger: &str,
    change: &PipelineChange,
    failure: Option<String>,
) {
    let new_tables: Vec<String> = change.new_tables.iter().map(ToString::to_string).collect();
    let about = RunAbout {
        subject: Some(change.changed.join("; ")),
        by: Some(trigger.to_string()),
        detail: Some(json!({ "changed": change.changed, "new_tables": new_tables })),
    };
    record_finished(log, runs_topic, pipeline, RunKind::Reload, about, failure).await;
}

/// Sends a request on `tx` at each `SIGHUP` until `stop`.
pub async fn on_sighup(tx: mpsc::Sender<&'static str>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot watch SIGHUP, reload by signal is off: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        info!("SIGHUP received: reloading the pipeline files");
        // Full: a reload is pending already, which reads the files as they are then.
        let _ = tx.try_send("SIGHUP");
    }
}

/// `--watch`: sends a request on `tx` whenever the content of one of `files` changes (checked
/// every `interval`; content, not mtime, so a save within the same second is seen), until `stop`.
pub async fn watch_files(
    files: Vec<PathBuf>,
    interval: Duration,
    tx: mpsc::Sender<&'static str>,
    stop: CancellationToken,
) {
    let fingerprint = |files: &[PathBuf]| -> Vec<Option<Vec<u8>>> {
        files.iter().map(|f| std::fs::read(f).ok()).collect()
    };
    let mut seen = fingerprint(&files);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = fingerprint(&files);
        if now != seen {
            seen = now;
            info!("a pipeline file changed: reloading");
            let _ = tx.try_send("watch");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(extra_sync: &str, fields: &str, key: &str) -> PipelineConfig {
        let yaml = format!(
            "version: 1\nname: p\nsource: {{ url: 'postgres://u@h/db' }}\ngraph:\n  tenant: 00000000-0000-0000-0000-000000000002\n  client_id: 00000000-0000-0000-0000-000000000001\n  client_secret: s\n  site: 'contoso.sharepoint.com:/sites/x'\nsync:\n  - table: public.a\n    list: A\n{key}    fields: {{ {fields} }}\n{extra_sync}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, yaml).unwrap();
        config::load_files(&[f]).unwrap().remove(0)
    }

    #[test]
    fn fields_and_tables_apply_and_say_what_changed() {
        let old = pipeline("", "title: Title", "");
        let new = pipeline(
            "  - table: public.b\n    list: B\n    fields: { name: Title }\n",
            "title: Title, note: Note",
            "",
        );
        let plan = compare(std::slice::from_ref(&old), vec![new]).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(
            plan[0].changed,
            [
                "table public.a: fields added [\"Note\"]",
                "table public.b added (list \"B\")"
            ]
        );
        let new: Vec<String> = plan[0].new_tables.iter().map(ToString::to_string).collect();
        assert_eq!(new, ["public.b"]);
        // The same file again: nothing to do.
        assert!(
            compare(std::slice::from_ref(&old), vec![old.clone()])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_query_source_added_or_changed_applies_and_is_not_published() {
        let q = |sql: &str| {
            format!(
                "  - query: {sql}\n    key: [id]\n    list: Q\n    fields: {{ name: Title }}\n    poll: {{ every: 2s, full: true }}\n"
            )
        };
        let old = pipeline("", "title: Title", "");
        let added = pipeline(&q("SELECT id, name FROM v"), "title: Title", "");
        let plan = compare(std::slice::from_ref(&old), vec![added.clone()]).unwrap();
        assert_eq!(plan[0].changed, ["table query.q added (list \"Q\")"]);
        assert!(
            plan[0].new_tables.is_empty(),
            "a query is not added to the publication"
        );
        let changed = pipeline(&q("SELECT id, name FROM w"), "title: Title", "");
        let plan = compare(std::slice::from_ref(&added), vec![changed]).unwrap();
        assert_eq!(plan[0].changed, ["table query.q: query or poll changed"]);
    }

    #[test]
    fn a_key_change_or_a_removed_table_is_refused_with_the_reason() {
        let old = pipeline(
            "  - table: public.b\n    list: B\n    fields: { name: Title }\n",
            "title: Title",
            "",
        );
        let new = pipeline("", "title: Title", "    key: [title]\n");
        let Err(ReloadError::Refused(why)) = compare(std::slice::from_ref(&old), vec![new]) else {
            panic!("not refused");
        };
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("public.a: key changed from the primary key to [\"title\"]"));
        assert!(why[1].contains("table public.b removed"));
        let mut renamed = old.clone();
        renamed.name = "q".into();
        let err = compare(std::slice::from_ref(&old), vec![renamed]).unwrap_err();
        assert!(err.to_string().contains("names its slot"), "{err}");
        assert_eq!(err.outcome(), "refused");
    }
}
