//! Who runs a tick: a row of `syncbridge_meta.schedule_ticks` (migration 0005).
//!
//! Invariant: a tick's job runs in the process whose `INSERT` created the row; the primary key
//! (pipeline, schedule, tick) makes every other process's insert a no-op, so the job runs once
//! per tick however many processes run the pipeline, and whichever process is up first takes it.
//! A row is written before the job starts: a process that dies mid-job does not hand the tick
//! to another (at most once; the failed or orphaned run says so).

use super::super::meta::{MetaDb, MetaError};

/// Rows older than this are pruned on each claim: only the newest tick per schedule is read.
const KEEP_TICKS_MS: i64 = 7 * 24 * 3600 * 1000;

/// Claims `tick_ms` of `schedule` for `owner`; true when this call took it.
pub async fn claim(
    db: &MetaDb,
    pipeline: &str,
    schedule: &str,
    tick_ms: i64,
    owner: &str,
) -> Result<bool, MetaError> {
    let client = db.client().await?;
    let inserted = client
        .execute(
            "INSERT INTO syncbridge_meta.schedule_ticks \
             (pipeline, schedule, tick_ms, owner, claimed_ms) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
            &[
                &pipeline,
                &schedule,
                &tick_ms,
                &owner,
                &super::super::meta::now_ms(),
            ],
        )
        .await?;
    if inserted == 1 {
        client
            .execute(
                "DELETE FROM syncbridge_meta.schedule_ticks \
                 WHERE pipeline = $1 AND schedule = $2 AND tick_ms < $3",
                &[&pipeline, &schedule, &(tick_ms - KEEP_TICKS_MS)],
            )
            .await?;
    }
    Ok(inserted == 1)
}

/// The newest tick of `schedule` any process claimed, if any.
pub async fn last_tick(
    db: &MetaDb,
    pipeline: &str,
    schedule: &str,
) -> Result<Option<i64>, MetaError> {
    let row = db
        .client()
        .await?
        .query_one(
            "SELECT max(tick_ms) FROM syncbridge_meta.schedule_ticks \
             WHERE pipeline = $1 AND schedule = $2",
            &[&pipeline, &schedule],
        )
        .await?;
    Ok(row.get(0))
}
