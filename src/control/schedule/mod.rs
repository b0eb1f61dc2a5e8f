//! The scheduler: runs each `schedules:` entry of a pipeline at its cron ticks, in its time zone.
//!
//! - Once per tick across processes: before a tick's job starts, the process claims the tick
//!   in the meta-store ([`lease`]); only the one whose claim created the row runs it. Processes
//!   that cannot reach the meta-store skip the tick (never run it unclaimed).
//! - Each tick that runs is a `scheduled` run (`subject`: `<schedule>: <job> @ <tick>`), failed
//!   with the job's reason when the job fails; the job records its own run too where it has one
//!   (`resnapshot`, `dlq_replay`).
//! - `catch_up: true`: at start, when the newest tick before now is later than the newest tick
//!   any process claimed, it runs once (however many were missed). A schedule never claimed
//!   before has missed nothing.
//! - Ticks of one schedule never overlap: the next tick is computed after the job ended, so a
//!   job longer than its period skips the ticks it overran.
//!
//! The jobs themselves are [`jobs::JobRunner`]s; `drift_check` / `drift_heal` fail as "not
//! available in this build" until a runner is registered for them.

pub mod jobs;
pub mod lease;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use croner::Cron;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::meta::runs::owner;
use super::meta::{MetaDb, RunKind, RunRecorder, RunStatus};
use super::notify::Notifier;
use crate::config::{ScheduleConfig, parse_cron};
use crate::log::AnyLog;
pub use jobs::{JobOutcome, JobRunner, JobRunners};

/// Wait after a failed claim or next-tick computation before trying again, so a broken
/// meta-store does not spin.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How long a stopping pipeline waits for a job in progress before cancelling it: a claimed
/// tick whose short job (a DLQ replay, a drift check) is cut off by a SIGTERM would leave a
/// cancelled run and no job run behind, so such jobs get to finish; a long one (a re-snapshot
/// needs the capture that is stopping too) is not waited for.
const JOB_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// What one pipeline's scheduler needs.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub pipeline: String,
    pub schedules: Vec<ScheduleConfig>,
    pub db: Arc<MetaDb>,
    pub log: Arc<AnyLog>,
    /// The pipeline's runs topic.
    pub runs_topic: String,
    pub runners: JobRunners,
    /// Raises `job_failed:<schedule>` on a failed tick, clears it on a good one.
    pub notifier: Option<Notifier>,
}

/// Runs every schedule of the pipeline until `shutdown`; a job in progress gets
/// [`JOB_DRAIN_GRACE`] to finish, then its run ends cancelled.
pub async fn run(scheduler: Scheduler, shutdown: CancellationToken) {
    let s = Arc::new(scheduler);
    let tasks = s.schedules.iter().filter_map(|entry| {
        match parse_cron(&entry.cron) {
            Ok(cron) => Some(run_schedule(
                s.clone(),
                entry.clone(),
                cron,
                shutdown.clone(),
            )),
            // Validation parsed it already; reaching this is a bug, said loudly.
            Err(e) => {
                warn!(pipeline = %s.pipeline, schedule = %entry.name, "schedule not started: {e}");
                None
            }
        }
    });
    futures::future::join_all(tasks).await;
}

async fn run_schedule(
    s: Arc<Scheduler>,
    entry: ScheduleConfig,
    cron: Cron,
    shutdown: CancellationToken,
) {
    if entry.catch_up {
        match missed_tick(&s, &entry, &cron, Utc::now()).await {
            Ok(Some(tick)) => {
                info!(pipeline = %s.pipeline, schedule = %entry.name, %tick, "catching up a missed tick");
                fire(&s, &entry, tick, &shutdown).await;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(pipeline = %s.pipeline, schedule = %entry.name, "cannot look for a missed tick: {e}")
            }
        }
    }
    loop {
        let Some(tick) = next_tick(&cron, &entry, Utc::now()) else {
            warn!(pipeline = %s.pipeline, schedule = %entry.name, "no next tick; schedule ends");
            return;
        };
        let wait = (tick - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        fire(&s, &entry, tick, &shutdown).await;
    }
}

/// The first tick after `now`, in UTC.
pub fn next_tick(cron: &Cron, entry: &ScheduleConfig, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&now.with_timezone(&entry.time_zone), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The newest tick at or before `now`, when it is later than `last_claimed` (a tick no process
/// ran); `None` when nothing was ever claimed.
pub fn missed_since(
    cron: &Cron,
    entry: &ScheduleConfig,
    now: DateTime<Utc>,
    last_claimed: Option<i64>,
) -> Option<DateTime<Utc>> {
    let last = last_claimed?;
    let prev = cron
        .find_previous_occurrence(&now.with_timezone(&entry.time_zone), true)
        .ok()?
        .with_timezone(&Utc);
    (prev.timestamp_millis() > last).then_some(prev)
}

async fn missed_tick(
    s: &Scheduler,
    entry: &ScheduleConfig,
    cron: &Cron,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, super::meta::MetaError> {
    let last = lease::last_tick(&s.db, &s.pipeline, &entry.name).await?;
    Ok(missed_since(cron, entry, now, last))
}

/// Claims `tick` and, when this process got it, runs the job as a `scheduled` run.
async fn fire(
    s: &Scheduler,
    entry: &ScheduleConfig,
    tick: DateTime<Utc>,
    shutdown: &CancellationToken,
) {
    let ms = tick.timestamp_millis();
    match lease::claim(&s.db, &s.pipeline, &entry.name, ms, &owner()).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            warn!(pipeline = %s.pipeline, schedule = %entry.name, "cannot claim the tick, skipping it: {e}");
            tokio::time::sleep(RETRY_PAUSE).await;
            return;
        }
    }
    let subject = format!(
        "{}: {} @ {}",
        entry.name,
        entry.job,
        tick.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    let mut run = match RunRecorder::start_about(
        s.log.clone(),
        s.runs_topic.clone(),
        &s.pipeline,
        RunKind::Scheduled,
        Some(subject),
    )
    .await
    {
        Ok(run) => run,
        Err(e) => {
            warn!(pipeline = %s.pipeline, schedule = %entry.name, "cannot record the scheduled run, skipping the tick: {e}");
            return;
        }
    };
    // A stopping pipeline waits a little for the job, not for a long one (see
    // JOB_DRAIN_GRACE): then the run ends cancelled.
    let job = s.runners.run(entry);
    tokio::pin!(job);
    let result = tokio::select! {
        r = &mut job => r,
        () = shutdown.cancelled() => {
            match tokio::time::timeout(JOB_DRAIN_GRACE, &mut job).await {
                Ok(r) => r,
                Err(_) => {
                    let why = Some("the pipeline stopped while the job ran".to_string());
                    if let Err(e) = run.finish(RunStatus::Cancelled, Default::default(), why).await {
                        warn!(pipeline = %s.pipeline, run = %run.run_id(), "cannot record the cancelled scheduled run: {e}");
                    }
                    return;
                }
            }
        }
    };
    let key = format!("job_failed:{}", entry.name);
    let (status, counts, reason) = match result {
        Ok(out) => {
            if let Some(n) = &s.notifier {
                n.clear(&key);
            }
            (RunStatus::Succeeded, out.counts, None)
        }
        Err(why) => {
            if let Some(n) = &s.notifier {
                let summary = format!("scheduled job {} ({}) failed", entry.name, entry.job);
                n.raise(&key, &summary, &why);
            }
            (RunStatus::Failed, Default::default(), Some(why))
        }
    };
    info!(pipeline = %s.pipeline, schedule = %entry.name, run = %run.run_id(), status = status.as_str(), "scheduled job ended");
    if let Err(e) = run.finish(status, counts, reason).await {
        warn!(pipeline = %s.pipeline, run = %run.run_id(), "cannot record the end of the scheduled run: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JobKind;
    use chrono::TimeZone;

    fn entry(cron: &str, tz: chrono_tz::Tz) -> (ScheduleConfig, Cron) {
        let e = ScheduleConfig {
            name: "s".into(),
            cron: cron.into(),
            time_zone: tz,
            job: JobKind::DlqReplay,
            tables: vec![],
            catch_up: true,
        };
        (e, parse_cron(cron).unwrap())
    }

    #[test]
    fn next_tick_is_read_in_the_time_zone() {
        // 02:00 in Berlin is 01:00 UTC in winter.
        let (e, cron) = entry("0 2 * * *", chrono_tz::Europe::Berlin);
        let now = Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 0).unwrap();
        let next = next_tick(&cron, &e, now).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 12, 8, 1, 0, 0).unwrap());
        let (e, cron) = entry("*/5 * * * * *", chrono_tz::UTC);
        let next = next_tick(&cron, &e, now).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 5).unwrap());
    }

    #[test]
    fn a_missed_tick_is_caught_up_once_and_only_after_a_claim() {
        let (e, cron) = entry("0 * * * *", chrono_tz::UTC);
        let now = Utc.with_ymd_and_hms(2026, 12, 7, 10, 30, 0).unwrap();
        let at = |h| Utc.with_ymd_and_hms(2026, 12, 7, h, 0, 0).unwrap();
        // Down since 07:00: only the newest missed tick runs.
        let missed = missed_since(&cron, &e, now, Some(at(7).timestamp_millis()));
        assert_eq!(missed, Some(at(10)));
        // 10:00 already ran somewhere: nothing missed.
        assert_eq!(
            missed_since(&cron, &e, now, Some(at(10).timestamp_millis())),
            None
        );
        // Never claimed: a new schedule has missed nothing.
        assert_eq!(missed_since(&cron, &e, now, None), None);
    }
}
