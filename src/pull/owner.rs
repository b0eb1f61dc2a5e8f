//! One delta poller per list across the processes of a pipeline (issue 15).
//!
//! With the Kafka log several `syncbridge run` processes may run one pipeline. Every one prepares
//! a poller for each list that pulls, but only the process holding the list's lock polls it:
//! [`run_owned`] takes a session advisory lock (`crate::pg::acquire_advisory_lock`, key
//! `poller:<pipeline>:<list id>`) on a connection of its own and runs the poller while it holds
//! it. The others stand by, retrying every [`crate::pg::LOCK_RETRY_INTERVAL`]; when the holder
//! dies its connection closes, PostgreSQL drops the lock and a standby takes it and continues
//! from the stored delta link (the cursors topic, [`super::poller`]). A holder whose lock
//! connection breaks stops its poller at once (another process may hold the lock already) and
//! tries again.
//!
//! # Where the lock lives: the source database
//! Capture's single-reader lock is there already, every process of the pipeline must reach that
//! database anyway (capture, the applier), and the pulls a poller feeds can only be applied while
//! it is reachable, so the lock adds no dependency. (The meta-store is often the same database;
//! when it is not, locking there would stop the pollers on an outage of a store that is only the
//! run history.) Advisory locks are not replicated: after a failover every holder loses its
//! connection and the locks are taken again on the new primary.
//!
//! # What a double poller would cost, and why it is still excluded
//! Two pollers of one list append every change twice (the ledger absorbs the duplicate) and
//! spend the tenant's delta budget twice. The stop on a lost lock is prompt but an append and the
//! cursor store after it are never interrupted, so the old and new owner may overlap by one
//! round: changes are re-delivered, never lost.
//!
//! Operator resets of the delta link (`POST /pipelines/{name}/cursors/reset`) reaching a process
//! that stands by are refused with [`NOT_OWNER`]: it has no poller to reset.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

use super::poller::{self, PollerConfig, PullError, ResetRequest};
use crate::control::Readiness;
use crate::graph::GraphClient;
use crate::log::EventLog;
use crate::telemetry::metrics as m;

/// The answer to a delta-link reset sent to a process that does not run the list's poller.
pub const NOT_OWNER: &str = "this process stands by for the list's delta poller (another process \
     of the pipeline runs it, see /ready `owns`): send the reset to that process";

/// Where a list's ownership is decided and shown.
#[derive(Debug, Clone)]
pub struct Ownership {
    /// The source database (see the module docs).
    pub lock_url: String,
    /// Between two tries while another process holds the lock.
    pub retry: Duration,
    /// `/ready`'s `owns` (`poller:<list name>`).
    pub readiness: Readiness,
}

/// The lock key of a list's poller.
pub fn lock_name(pipeline: &str, list_id: &str) -> String {
    format!("poller:{pipeline}:{list_id}")
}

/// Runs the poller of `cfg`'s list whenever this process holds the list's lock (see the module
/// docs), until `shutdown` (then `Ok`) or a non-retryable error.
pub async fn run_owned<L: EventLog>(
    cfg: PollerConfig,
    client: Arc<GraphClient>,
    log: Arc<L>,
    mut resets: Option<Receiver<ResetRequest>>,
    own: Ownership,
    shutdown: CancellationToken,
) -> Result<(), PullError> {
    let key = crate::pg::lock_key(&lock_name(&cfg.pipeline, &cfg.list_id));
    let shown = format!("poller:{}", cfg.list_name);
    let gauge = metrics::gauge!(m::PULL_POLLER_OWNED, "pipeline" => cfg.pipeline.clone(), "list" => cfg.list_name.clone());
    let mark = |owned: bool| {
        gauge.set(if owned { 1.0 } else { 0.0 });
        own.readiness.set_owner(&cfg.pipeline, &shown, owned);
    };
    mark(false);
    loop {
        let standby = CancellationToken::new();
        let standing_by = || {
            tracing::info!(pipeline = %cfg.pipeline, list = %cfg.list_name,
                "another process runs this list's delta poller; standing by");
            standby.cancel();
        };
        let acquire =
            crate::pg::acquire_advisory_lock(&own.lock_url, key, own.retry, &shutdown, standing_by);
        let lock = match refusing_resets(acquire, &standby, &mut resets).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(()),
            Err(e) if e.is_retryable() => {
                tracing::warn!(pipeline = %cfg.pipeline, list = %cfg.list_name, error = %e,
                    "cannot reach the database holding the poller's lock; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(own.retry) => continue,
                }
            }
            Err(source) => return Err(PullError::Lock(source)),
        };
        tracing::info!(pipeline = %cfg.pipeline, list = %cfg.list_name, "this process runs the list's delta poller");
        mark(true);
        let stop = shutdown.child_token();
        let run = poller::run_lending(
            cfg.clone(),
            client.clone(),
            log.clone(),
            resets.take(),
            stop.clone(),
        );
        tokio::pin!(run);
        let (result, back) = tokio::select! {
            r = &mut run => r,
            () = lock.lost.cancelled() => {
                tracing::warn!(pipeline = %cfg.pipeline, list = %cfg.list_name,
                    "lost the poller's lock connection; stopping the poller");
                stop.cancel();
                run.await
            }
        };
        mark(false);
        drop(lock);
        resets = back;
        if shutdown.is_cancelled() {
            return result;
        }
        result?;
    }
}

/// Awaits `f`; once `standby` is cancelled (another process holds the lock) the resets that
/// arrive are answered with [`NOT_OWNER`]. Before that they wait in the channel: the lock may
/// be free, and then this process's poller serves them.
async fn refusing_resets<T>(
    f: impl Future<Output = T>,
    standby: &CancellationToken,
    resets: &mut Option<Receiver<ResetRequest>>,
) -> T {
    tokio::pin!(f);
    tokio::select! {
        out = &mut f => return out,
        () = standby.cancelled() => {}
    }
    loop {
        let next = async {
            match resets.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            out = &mut f => return out,
            req = next => match req {
                Some(reply) => {
                    let _ = reply.send(Err(NOT_OWNER.into()));
                }
                None => *resets = None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_standby_refuses_resets_while_it_waits() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut resets = Some(rx);
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(reply).await.unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u8>();
        let standby = CancellationToken::new();
        standby.cancel();
        let waiting = refusing_resets(async { done_rx.await.unwrap() }, &standby, &mut resets);
        let refused = async {
            let a = answer.await.unwrap();
            done_tx.send(7).unwrap();
            a
        };
        let (out, a) = tokio::join!(waiting, refused);
        assert_eq!(out, 7);
        assert_eq!(a, Err(NOT_OWNER.to_string()));
        assert!(
            resets.is_some(),
            "the channel is kept for the next owner term"
        );
    }

    #[tokio::test]
    async fn resets_wait_for_the_poller_while_the_lock_may_be_free() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut resets = Some(rx);
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        tx.send(reply).await.unwrap();
        // The lock taken at the first try: the reset stays for the poller.
        let out = refusing_resets(async { 7 }, &CancellationToken::new(), &mut resets).await;
        assert_eq!(out, 7);
        assert!(answer.try_recv().is_err(), "not answered");
        let pending = resets.as_mut().unwrap().try_recv();
        assert!(pending.is_ok(), "still queued for the poller");
    }

    #[test]
    fn each_list_of_each_pipeline_has_its_own_lock() {
        let keys = [
            crate::pg::lock_key(&lock_name("p", "L1")),
            crate::pg::lock_key(&lock_name("p", "L2")),
            crate::pg::lock_key(&lock_name("q", "L1")),
            // Capture's slot lock of a pipeline named like this.
            crate::pg::lock_key("sb_p"),
        ];
        let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }
}
