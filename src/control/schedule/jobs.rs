//! What a scheduled job does: a [`JobRunner`] per [`JobKind`], looked up in [`JobRunners`].
//!
//! Built in: `resnapshot` (through capture's [`ResnapshotHandle`], one table after the other,
//! each waited for), `dlq_replay` ([`replay_dead_letters`], the API's logic), and `drift_check` /
//! `drift_heal` (the pipeline's [`DriftHandle`], as `POST /pipelines/{name}/drift[/heal]`; the
//! check records its own run too). A kind without a runner fails its ticks with "not available
//! in this build".

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::capture::ResnapshotHandle;
use crate::capture::resnapshot::{RequestError, ResnapshotState};
use crate::config::{JobKind, ScheduleConfig};
use crate::control::meta::RunCounts;
use crate::control::pipelines::{PipelineHandle, replay_dead_letters};
use crate::process::drift::DriftHandle;

/// What a finished job reports into its scheduled run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOutcome {
    pub counts: RunCounts,
}

/// A boxed job future (the runners are trait objects).
pub type JobFuture<'a> = Pin<Box<dyn Future<Output = Result<JobOutcome, String>> + Send + 'a>>;

/// Runs one kind of job for one pipeline; `Err` is the failed run's reason.
pub trait JobRunner: Send + Sync + fmt::Debug {
    fn run<'a>(&'a self, schedule: &'a ScheduleConfig) -> JobFuture<'a>;
}

/// The runners of one pipeline, by job kind.
#[derive(Debug, Clone, Default)]
pub struct JobRunners(HashMap<JobKind, Arc<dyn JobRunner>>);

impl JobRunners {
    /// The built-in runners for a running pipeline.
    pub fn builtin(resnapshot: ResnapshotHandle, pipeline: PipelineHandle) -> Self {
        let mut r = Self::default();
        r.insert(JobKind::Resnapshot, Arc::new(Resnapshot(resnapshot)));
        r.insert(JobKind::DlqReplay, Arc::new(DlqReplay(pipeline)));
        r
    }

    /// Adds the drift check and heal of the pipeline.
    pub fn with_drift(mut self, drift: DriftHandle) -> Self {
        self.insert(
            JobKind::DriftCheck,
            Arc::new(Drift {
                handle: drift.clone(),
                heal: false,
            }),
        );
        self.insert(
            JobKind::DriftHeal,
            Arc::new(Drift {
                handle: drift,
                heal: true,
            }),
        );
        self
    }

    /// Adds (or replaces) the runner of `kind`: how later features plug in.
    pub fn insert(&mut self, kind: JobKind, runner: Arc<dyn JobRunner>) {
        self.0.insert(kind, runner);
    }

    /// Runs `schedule`'s job; a kind without a runner fails.
    pub async fn run(&self, schedule: &ScheduleConfig) -> Result<JobOutcome, String> {
        match self.0.get(&schedule.job) {
            Some(runner) => runner.run(schedule).await,
            None => Err(format!(
                "job `{}` is not available in this build",
                schedule.job
            )),
        }
    }
}

#[derive(Debug)]
struct Drift {
    handle: DriftHandle,
    heal: bool,
}

impl JobRunner for Drift {
    fn run<'a>(&'a self, _schedule: &'a ScheduleConfig) -> JobFuture<'a> {
        Box::pin(async move {
            let report = if self.heal {
                self.handle.heal().await
            } else {
                self.handle.check().await
            }
            .map_err(|e| e.to_string())?;
            Ok(JobOutcome {
                counts: RunCounts {
                    drift: report.counts,
                    graph_requests: report.graph_requests,
                    resource_units: report.resource_units,
                    ..RunCounts::default()
                },
            })
        })
    }
}

/// How often a queued or running re-snapshot is looked at while a job waits for its turn.
const RESNAPSHOT_BUSY_POLL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Resnapshot(ResnapshotHandle);

impl JobRunner for Resnapshot {
    fn run<'a>(&'a self, schedule: &'a ScheduleConfig) -> JobFuture<'a> {
        Box::pin(async move {
            let mut counts = RunCounts::default();
            for table in &schedule.tables {
                counts.rows += resnapshot_one(&self.0, table).await?;
            }
            Ok(JobOutcome { counts })
        })
    }
}

/// Requests one table's re-snapshot (waiting while another one runs) and waits for it to end;
/// its rows, or why it failed.
async fn resnapshot_one(handle: &ResnapshotHandle, table: &str) -> Result<u64, String> {
    let mut status = handle.subscribe();
    let id = loop {
        match handle.request(table) {
            Ok(s) => break s.id,
            Err(RequestError::Busy { .. }) => tokio::time::sleep(RESNAPSHOT_BUSY_POLL).await,
            Err(e) => return Err(e.to_string()),
        }
    };
    loop {
        if let Some(s) = status.borrow_and_update().as_ref().filter(|s| s.id == id) {
            match s.state {
                ResnapshotState::Done => return Ok(s.rows),
                ResnapshotState::Failed => {
                    return Err(s.error.clone().unwrap_or_else(|| "failed".into()));
                }
                ResnapshotState::Queued | ResnapshotState::Running => {}
            }
        }
        if status.changed().await.is_err() {
            return Err(format!(
                "capture stopped before the re-snapshot of {table} ended"
            ));
        }
    }
}

#[derive(Debug)]
struct DlqReplay(PipelineHandle);

impl JobRunner for DlqReplay {
    fn run<'a>(&'a self, _: &'a ScheduleConfig) -> JobFuture<'a> {
        Box::pin(async move {
            let done = replay_dead_letters(&self.0)
                .await
                .map_err(|e| e.to_string())?;
            Ok(JobOutcome {
                counts: RunCounts {
                    replayed: done.replayed as u64,
                    ..RunCounts::default()
                },
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(job: JobKind) -> ScheduleConfig {
        ScheduleConfig {
            name: "s".into(),
            cron: "* * * * *".into(),
            time_zone: chrono_tz::UTC,
            job,
            tables: vec![],
            catch_up: false,
        }
    }

    #[derive(Debug)]
    struct Fixed;
    impl JobRunner for Fixed {
        fn run<'a>(&'a self, _: &'a ScheduleConfig) -> JobFuture<'a> {
            Box::pin(async {
                Ok(JobOutcome {
                    counts: RunCounts {
                        rows: 7,
                        ..RunCounts::default()
                    },
                })
            })
        }
    }

    #[tokio::test]
    async fn drift_jobs_fail_until_a_runner_is_registered() {
        let mut runners = JobRunners::default();
        let err = runners
            .run(&schedule(JobKind::DriftCheck))
            .await
            .unwrap_err();
        assert_eq!(err, "job `drift_check` is not available in this build");
        runners.insert(JobKind::DriftCheck, Arc::new(Fixed));
        let out = runners.run(&schedule(JobKind::DriftCheck)).await.unwrap();
        assert_eq!(out.counts.rows, 7);
        assert!(runners.run(&schedule(JobKind::DriftHeal)).await.is_err());
    }
}
