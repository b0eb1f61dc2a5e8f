//! Holding a running pipeline's push processor stopped while an operator moves its input
//! positions (a cursor reset of its consumer groups, `crate::control::cursors`).
//!
//! # Contract
//! [`HoldHandle::hold`] asks the runtime's supervisor to stop the processor the way a shutdown
//! does (it flushes what it has read and commits its offsets) and answers with a [`Held`] once it
//! has stopped: from then on no consumer of the processor's groups is live, so positions stored
//! now are the ones the next processor starts from. Dropping the [`Held`] restarts the processor
//! from its committed offsets (as `POST /pipelines/{name}/resume` does). A paused processor is
//! already stopped: the hold is granted at once and the pipeline stays paused after it.

use tokio::sync::{mpsc, oneshot};

/// Hold requests in flight per pipeline: one reset at a time is served, a second waits.
const HOLD_QUEUE: usize = 1;

/// The processor is stopped until this is dropped.
#[derive(Debug)]
pub struct Held {
    _release: oneshot::Sender<()>,
}

/// Why a hold was not granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// The processor stopped for good (it failed, or the pipeline is shutting down).
    #[error("the push processor of pipeline {0} is not running (it failed or is shutting down)")]
    NotRunning(String),
}

type Request = oneshot::Sender<Held>;

/// The control plane's side: asks for holds (cheap to clone).
#[derive(Debug, Clone)]
pub struct HoldHandle {
    pipeline: String,
    tx: mpsc::Sender<Request>,
}

/// The supervisor's side: the hold requests to serve.
#[derive(Debug)]
pub struct HoldRequests {
    rx: mpsc::Receiver<Request>,
}

impl HoldHandle {
    pub fn channel(pipeline: &str) -> (HoldHandle, HoldRequests) {
        let (tx, rx) = mpsc::channel(HOLD_QUEUE);
        (
            HoldHandle {
                pipeline: pipeline.to_string(),
                tx,
            },
            HoldRequests { rx },
        )
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// Stops the processor (flush and commit) and keeps it stopped until the [`Held`] is dropped.
    pub async fn hold(&self) -> Result<Held, HoldError> {
        let not_running = || HoldError::NotRunning(self.pipeline.clone());
        let (reply, granted) = oneshot::channel();
        self.tx.send(reply).await.map_err(|_| not_running())?;
        granted.await.map_err(|_| not_running())
    }
}

impl HoldRequests {
    /// The next request; pending forever once every handle is gone.
    pub async fn next(&mut self) -> Request {
        match self.rx.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }
}

/// Grants `request` (the processor has stopped) and waits until the holder lets go, or until
/// `stop`. A requester that gave up is let go at once.
pub async fn grant(request: Request, stop: &tokio_util::sync::CancellationToken) {
    let (release, released) = oneshot::channel();
    if request.send(Held { _release: release }).is_err() {
        return;
    }
    tokio::select! {
        _ = released => {}
        () = stop.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hold_lasts_until_the_guard_is_dropped() {
        let (handle, mut requests) = HoldHandle::channel("p");
        let stop = tokio_util::sync::CancellationToken::new();
        let supervisor = tokio::spawn(async move {
            let r = requests.next().await;
            grant(r, &stop).await;
            "released"
        });
        let held = handle.hold().await.expect("granted");
        tokio::task::yield_now().await;
        assert!(!supervisor.is_finished(), "held while the guard lives");
        drop(held);
        assert_eq!(supervisor.await.unwrap(), "released");
        // The supervisor is gone: no hold can be granted.
        assert_eq!(
            handle.hold().await.unwrap_err(),
            HoldError::NotRunning("p".into())
        );
    }
}
