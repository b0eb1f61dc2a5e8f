//! Creates and upgrades the `syncbridge_meta` schema with refinery, from the SQL files in
//! `migrations/` (embedded into the binary).
//!
//! Invariant: two processes starting at once apply each migration once. refinery takes no lock of
//! its own, so [`migrate`] holds a session `pg_advisory_lock` on a dedicated connection around
//! the whole run (`CREATE SCHEMA` included); the lock goes with the connection, so a process that
//! dies while migrating does not block the next one.

use refinery::{Migration, Runner};
use tracing::info;

use super::{MetaError, SCHEMA, connect};

/// The migrations, in order: `(file stem, SQL)`. Files are named `NNNN_<what>.sql`; refinery's
/// own naming (`V<n>__<what>`) is derived from the stem. A unit test checks this list against
/// the folder.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_runs",
        include_str!("../../../migrations/0001_runs.sql"),
    ),
    (
        "0002_run_subject",
        include_str!("../../../migrations/0002_run_subject.sql"),
    ),
    (
        "0003_audit",
        include_str!("../../../migrations/0003_audit.sql"),
    ),
    (
        "0004_run_requests",
        include_str!("../../../migrations/0004_run_requests.sql"),
    ),
    (
        "0005_schedule_ticks",
        include_str!("../../../migrations/0005_schedule_ticks.sql"),
    ),
    (
        "0006_drift_reports",
        include_str!("../../../migrations/0006_drift_reports.sql"),
    ),
];

/// Key of the advisory lock that serialises migration runs (any fixed number unique to us:
/// "sbmeta" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x7362_6d65_7461;

/// Where refinery records what it applied.
const HISTORY_TABLE: &str = "syncbridge_meta.refinery_schema_history";

/// `0001_runs` → refinery's `V1__runs`.
fn refinery_name(stem: &str) -> Result<String, MetaError> {
    let (num, what) = stem
        .split_once('_')
        .ok_or_else(|| MetaError::Migrate(format!("{stem}: expected NNNN_<what>.sql")))?;
    let version: u32 = num
        .parse()
        .map_err(|_| MetaError::Migrate(format!("{stem}: expected NNNN_<what>.sql")))?;
    Ok(format!("V{version}__{what}"))
}

fn migrations() -> Result<Vec<Migration>, MetaError> {
    MIGRATIONS
        .iter()
        .map(|(stem, sql)| {
            Migration::unapplied(&refinery_name(stem)?, sql)
                .map_err(|e| MetaError::Migrate(format!("{stem}: {e}")))
        })
        .collect()
}

/// Applies the migrations not yet applied to the database at `url`; returns how many it applied.
/// Idempotent; safe to run from several processes at once (see the module docs).
pub async fn migrate(url: &str) -> Result<usize, MetaError> {
    let migrations = migrations()?;
    let lock = connect(url).await?;
    lock.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = async {
        let mut client = connect(url).await?;
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
            .await?;
        let report = Runner::new(&migrations)
            .set_migration_table_name(HISTORY_TABLE)
            .run_async(&mut client)
            .await
            .map_err(|e| MetaError::Migrate(crate::pg::with_causes(&e)))?;
        Ok::<_, MetaError>(report.applied_migrations().len())
    }
    .await;
    // Best effort: closing the connection releases the lock anyway.
    let _ = lock
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let applied = result?;
    if applied > 0 {
        info!(applied, "meta-store migrated");
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_the_folder_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".sql").map(str::to_string))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|(s, _)| s.to_string()).collect();
        assert_eq!(files, listed, "migrations/*.sql and MIGRATIONS differ");
        // Versions only grow; a gap is allowed (numbers are reserved per branch, e.g. 0004 before
        // 0002 and 0003 are merged), a repeat or a step back is not.
        let mut last = 0;
        for (stem, _) in MIGRATIONS {
            let (num, what) = stem.split_once('_').unwrap();
            let version: u32 = num.parse().unwrap();
            assert!(version > last, "{stem} after version {last}");
            assert_eq!(refinery_name(stem).unwrap(), format!("V{version}__{what}"));
            last = version;
        }
        assert_eq!(migrations().unwrap().len(), MIGRATIONS.len());
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(refinery_name("runs").is_err());
        assert!(refinery_name("x1_runs").is_err());
        assert_eq!(refinery_name("0012_audit").unwrap(), "V12__audit");
    }
}
