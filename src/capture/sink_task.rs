//! Appending on a task of its own, so reading overlaps encoding + appending.
//!
//! The reader (replication stream or snapshot query) hands each completed batch to a
//! [`SinkTask`] with a tag (the LSN, or the snapshot position, that may be acknowledged once the
//! batch is durable). One task appends the batches strictly in submission order and reports each
//! batch's tag after [`EventSink::append`] returned `Ok`, again in order; at the first failure it
//! reports the error and appends nothing more. So a reported tag always means "this batch and
//! every batch before it are durable", and the reader moves its progress marker only on those.
//!
//! At most `depth` batches are in flight (submitted, their outcome not yet taken by the reader):
//! a reader that is ahead waits in [`SinkTask::submit`] for the oldest outcome (backpressure), and
//! the memory held is bounded by `depth` batches. An empty batch is a pure ordering marker: its tag
//! is reported after everything before it, without calling the sink.
//!
//! An append in progress is never cancelled: a cancelled `append` future could leave the sink's
//! state (e.g. the Avro encoder's "schema already published" set) ahead of the log. Stopping
//! ([`SinkTask::stop`]) lets the current append finish and skips the queued ones.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::error::CaptureError;
use super::sink::{EventSink, SinkError};
use crate::event::change::ChangeEvent;
use crate::telemetry::metrics as m;

struct Job<T> {
    events: Vec<ChangeEvent>,
    tag: T,
}

/// A sink shared between the sessions of one capture run (one task uses it at a time).
pub(crate) type SharedSink<S> = Arc<Mutex<S>>;

/// The appending task of one session (see the module docs).
pub(crate) struct SinkTask<T> {
    jobs: Option<mpsc::Sender<Job<T>>>,
    done: mpsc::Receiver<Result<T, SinkError>>,
    in_flight: usize,
    depth: usize,
    pipeline: String,
    stop: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> SinkTask<T> {
    /// Starts the task; `depth` ≥ 1 batches may be in flight.
    pub(crate) fn spawn<S: EventSink + 'static>(
        sink: SharedSink<S>,
        depth: usize,
        pipeline: &str,
    ) -> Self {
        let depth = depth.max(1);
        // Both channels hold at most `depth` items because the reader keeps at most `depth`
        // batches in flight: neither side ever blocks on a send.
        let (jobs_tx, mut jobs_rx) = mpsc::channel::<Job<T>>(depth);
        let (done_tx, done_rx) = mpsc::channel(depth);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let label = pipeline.to_string();
        let handle = tokio::spawn(async move {
            loop {
                let job = tokio::select! {
                    biased;
                    _ = stopped.cancelled() => break,
                    job = jobs_rx.recv() => match job {
                        Some(job) => job,
                        None => break,
                    },
                };
                let Job { events, tag } = job;
                let result = if events.is_empty() {
                    Ok(())
                } else {
                    let t0 = Instant::now();
                    let r = sink.lock().await.append(&events).await;
                    metrics::histogram!(m::SINK_APPEND_SECONDS, "pipeline" => label.clone())
                        .record(t0.elapsed().as_secs_f64());
                    r
                };
                // The batch's memory is released before the reader may submit the next one.
                drop(events);
                match result {
                    Ok(()) => {
                        if done_tx.send(Ok(tag)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = done_tx.send(Err(e)).await;
                        break;
                    }
                }
            }
        });
        Self {
            jobs: Some(jobs_tx),
            done: done_rx,
            in_flight: 0,
            depth,
            pipeline: pipeline.to_string(),
            stop,
            handle: Some(handle),
        }
    }

    /// Batches submitted whose outcome the reader has not taken yet.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Nothing is waiting for the sink.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight == 0
    }

    /// Hands a batch to the task. When `depth` batches are in flight it first waits for the
    /// oldest one (backpressure) and passes its tag to `durable`, like every tag that becomes
    /// known here, before any error is returned: an error of the sink is returned as
    /// [`CaptureError::Sink`] and the batch is not submitted.
    pub(crate) async fn submit<F>(
        &mut self,
        events: Vec<ChangeEvent>,
        tag: T,
        durable: &mut F,
    ) -> Result<(), CaptureError>
    where
        F: FnMut(T) -> Result<(), CaptureError> + Send,
    {
        if self.in_flight >= self.depth {
            let t0 = Instant::now();
            while self.in_flight >= self.depth {
                durable(self.next_done().await?)?;
            }
            metrics::histogram!(m::CAPTURE_SINK_WAIT_SECONDS, "pipeline" => self.pipeline.clone())
                .record(t0.elapsed().as_secs_f64());
        }
        let sent = match &self.jobs {
            Some(tx) => tx.send(Job { events, tag }).await.is_ok(),
            None => false,
        };
        if !sent {
            // The task ended: its outcomes (durable tags, then the error) are still queued.
            self.drain(durable).await?;
            return Err(gone());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// The tag of the oldest batch in flight once it is durable. Cancel-safe; pending forever
    /// when nothing is in flight (so it can sit in a `select!` guarded by `in_flight() > 0`).
    pub(crate) async fn next_done(&mut self) -> Result<T, CaptureError> {
        if self.in_flight == 0 {
            return std::future::pending().await;
        }
        match self.done.recv().await {
            Some(Ok(tag)) => {
                self.in_flight -= 1;
                Ok(tag)
            }
            Some(Err(e)) => {
                // Nothing after a failed batch is appended: forget the rest.
                self.in_flight = 0;
                self.jobs = None;
                Err(CaptureError::Sink(e))
            }
            None => {
                self.in_flight = 0;
                self.jobs = None;
                Err(gone())
            }
        }
    }

    /// Waits until every submitted batch is durable, passing the tags to `durable` in order.
    pub(crate) async fn drain<F>(&mut self, durable: &mut F) -> Result<(), CaptureError>
    where
        F: FnMut(T) -> Result<(), CaptureError> + Send,
    {
        while self.in_flight > 0 {
            durable(self.next_done().await?)?;
        }
        Ok(())
    }

    /// Stops after the append in progress (queued batches are skipped) and waits for the task.
    /// Returns the tags of batches that became durable meanwhile, in order: they may still be
    /// acknowledged.
    pub(crate) async fn stop(mut self) -> Vec<T> {
        self.stop.cancel();
        self.jobs = None;
        let mut tags = Vec::new();
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
        while self.in_flight > 0 {
            match self.done.try_recv() {
                Ok(Ok(tag)) => {
                    self.in_flight -= 1;
                    tags.push(tag);
                }
                _ => break,
            }
        }
        tags
    }
}

impl<T> Drop for SinkTask<T> {
    fn drop(&mut self) {
        // A session left early (e.g. a panic or a dropped future): finish the current append,
        // skip the rest. The task ends by itself; the sink is free for the next session then.
        self.stop.cancel();
    }
}

fn gone() -> CaptureError {
    CaptureError::Sink(SinkError::fatal(
        "the capture sink task ended unexpectedly (panicked?)",
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::Future;
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use super::*;
    use crate::event::change::{Column, Op, Relation, Source, TypeKind, Value};

    fn event(n: i64) -> ChangeEvent {
        let relation = Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            columns: vec![Column {
                name: "id".into(),
                type_oid: 20,
                type_name: "int8".into(),
                type_modifier: -1,
                kind: TypeKind::Base,
                is_key: true,
                nullable: false,
            }],
            replica_identity: 'd',
            version: 1,
        });
        ChangeEvent {
            relation,
            op: Op::Create,
            before: None,
            after: Some(vec![Value::Text(n.to_string())]),
            source: Source {
                connector: crate::event::change::CONNECTOR_WAL,
                pipeline: "p".into(),
                db: "d".into(),
                lsn: n as u64,
                tx_id: None,
                commit_ts_ms: 0,
                origin: None,
                snapshot: false,
            },
            ts_ms: 0,
        }
    }

    /// Each append takes the next scripted (delay, outcome) and records the first event's LSN
    /// when it succeeds.
    #[derive(Clone, Default)]
    struct Scripted {
        script: Arc<StdMutex<VecDeque<(u64, bool)>>>,
        stored: Arc<StdMutex<Vec<u64>>>,
        calls: Arc<StdMutex<usize>>,
    }

    impl EventSink for Scripted {
        fn append(
            &mut self,
            events: &[ChangeEvent],
        ) -> impl Future<Output = Result<(), SinkError>> + Send {
            let (delay, ok) = self.script.lock().unwrap().pop_front().unwrap_or((0, true));
            *self.calls.lock().unwrap() += 1;
            let first = events[0].source.lsn;
            let stored = self.stored.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if ok {
                    stored.lock().unwrap().push(first);
                    Ok(())
                } else {
                    Err(SinkError::retryable("scripted failure"))
                }
            }
        }
    }

    fn task(sink: &Scripted, depth: usize) -> SinkTask<u64> {
        SinkTask::spawn(Arc::new(Mutex::new(sink.clone())), depth, "p")
    }

    /// Collects the tags reported durable.
    fn collect(into: &mut Vec<u64>) -> impl FnMut(u64) -> Result<(), CaptureError> + Send + '_ {
        |tag| {
            into.push(tag);
            Ok(())
        }
    }

    #[tokio::test]
    async fn tags_come_back_in_order_after_each_append() {
        let sink = Scripted::default();
        // The first append is the slowest: later batches must still wait for it.
        sink.script
            .lock()
            .unwrap()
            .extend([(80, true), (5, true), (0, true)]);
        let mut t = task(&sink, 3);
        let mut acked = Vec::new();
        for lsn in [10, 20, 30] {
            t.submit(vec![event(lsn as i64)], lsn, &mut collect(&mut acked))
                .await
                .unwrap();
        }
        assert!(acked.is_empty());
        assert_eq!(t.in_flight(), 3);
        assert_eq!(t.next_done().await.unwrap(), 10);
        t.drain(&mut collect(&mut acked)).await.unwrap();
        assert_eq!(acked, vec![20, 30]);
        assert!(t.idle());
        assert_eq!(*sink.stored.lock().unwrap(), vec![10, 20, 30]);
    }

    #[tokio::test]
    async fn a_failed_batch_stops_everything_after_it() {
        let sink = Scripted::default();
        sink.script
            .lock()
            .unwrap()
            .extend([(20, true), (0, false), (0, true)]);
        let mut t = task(&sink, 3);
        let mut acked = Vec::new();
        for lsn in [10, 20, 30] {
            t.submit(vec![event(lsn as i64)], lsn, &mut collect(&mut acked))
                .await
                .unwrap();
        }
        let err = t.drain(&mut collect(&mut acked)).await.unwrap_err();
        assert!(
            matches!(err, CaptureError::Sink(ref e) if e.retryable),
            "{err}"
        );
        // Only the batch before the failed one is reported; the third never reached the sink,
        // and nothing more is accepted.
        assert_eq!(acked, vec![10]);
        assert!(t.idle());
        assert!(
            t.submit(vec![event(40)], 40, &mut collect(&mut acked))
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(acked, vec![10]);
        assert_eq!(*sink.stored.lock().unwrap(), vec![10]);
        assert_eq!(*sink.calls.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_full_pipeline_waits_for_the_oldest_batch() {
        let sink = Scripted::default();
        sink.script.lock().unwrap().extend([(30, true), (30, true)]);
        let mut t = task(&sink, 2);
        let mut acked = Vec::new();
        t.submit(vec![event(1)], 1, &mut collect(&mut acked))
            .await
            .unwrap();
        t.submit(vec![event(2)], 2, &mut collect(&mut acked))
            .await
            .unwrap();
        assert!(acked.is_empty());
        // Depth 2: the third submit returns only once the first batch is durable.
        t.submit(vec![event(3)], 3, &mut collect(&mut acked))
            .await
            .unwrap();
        assert_eq!(acked, vec![1]);
        assert_eq!(*sink.stored.lock().unwrap(), vec![1]);
        t.drain(&mut collect(&mut acked)).await.unwrap();
        assert_eq!(acked, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn durable_tags_are_reported_before_a_later_failure() {
        let sink = Scripted::default();
        sink.script.lock().unwrap().extend([(0, true), (0, false)]);
        let mut t = task(&sink, 2);
        let mut acked = Vec::new();
        t.submit(vec![event(1)], 1, &mut collect(&mut acked))
            .await
            .unwrap();
        t.submit(vec![event(2)], 2, &mut collect(&mut acked))
            .await
            .unwrap();
        // The task has failed on batch 2 and ended before the reader looks again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = t
            .submit(vec![event(3)], 3, &mut collect(&mut acked))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CaptureError::Sink(ref e) if e.retryable),
            "{err}"
        );
        // Batch 1 is durable and reported; nothing after it.
        assert_eq!(acked, vec![1]);
        assert_eq!(*sink.stored.lock().unwrap(), vec![1]);
        assert_eq!(*sink.calls.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn an_empty_batch_is_ordered_behind_earlier_ones_without_an_append() {
        let sink = Scripted::default();
        sink.script.lock().unwrap().extend([(40, true)]);
        let mut t = task(&sink, 2);
        let mut acked = Vec::new();
        t.submit(vec![event(1)], 1, &mut collect(&mut acked))
            .await
            .unwrap();
        t.submit(Vec::new(), 2, &mut collect(&mut acked))
            .await
            .unwrap();
        t.drain(&mut collect(&mut acked)).await.unwrap();
        assert_eq!(acked, vec![1, 2]);
        assert_eq!(*sink.calls.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn stop_finishes_the_current_append_and_skips_the_queue() {
        let sink = Scripted::default();
        sink.script.lock().unwrap().extend([(60, true), (0, true)]);
        let mut t = task(&sink, 2);
        let mut acked = Vec::new();
        t.submit(vec![event(1)], 1, &mut collect(&mut acked))
            .await
            .unwrap();
        t.submit(vec![event(2)], 2, &mut collect(&mut acked))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(t.stop().await, vec![1]);
        assert_eq!(*sink.stored.lock().unwrap(), vec![1]);
        assert_eq!(*sink.calls.lock().unwrap(), 1);
    }
}
