//! Runs pipelines inside one process under one cancellation tree. Per pipeline: the log opens,
//! the lists are provisioned (or verified) and the push processor prepared (so a mapping that
//! does not fit fails the run before a slot is created), then capture, the delta pollers of the
//! return path and the processor start. With the Kafka log other processes may run the same
//! pipeline: capture and each list's poller then run only while this process holds their lock
//! (`crate::pg::acquire_advisory_lock`, `crate::pull::owner`; ops/docs/kafka.md "Scale-out"). Shutdown drains inputs before their consumer: capture
//! (acknowledges what is durable, stops reading), then the pollers, then the processor (flushes
//! and commits), and the log closes last, so nothing new enters a stage after the one feeding it
//! has stopped. Each pipeline's run history (`crate::control::meta`) starts before capture (the
//! meta-store migrated, the projector caught up, runs of a dead process marked failed, then this
//! process's stream run begun) and stops after the processor: the stream run's final event
//! carries the processor's final counts, and the projector writes it before the log closes. The
//! control plane starts first (a taken port fails the run before any work
//! begins) and stops last (`/health` stays up while draining).
//!
//! A reload (`crate::reload`: `SIGHUP`, `run --watch`) drains one changed pipeline as shutdown
//! does (`drain_one`) and starts it again (`start_one`) on its log, which stays open; when the
//! new config does not start, the old one is started again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::capture::snapshot::{FileProgress, ObservedProgress};
use crate::capture::{self, CaptureConfig, CaptureError, LogSink, ResnapshotHandle, TableSpec};
use crate::config::{self, PipelineConfig};
use crate::control::config_edit::ReloadOutcome;
use crate::control::meta::{
    self, MetaError, Projection, Projector, RunCounts, RunKind, RunRecorder, RunStatus,
};
use crate::control::pipelines::PipelineHandle;
use crate::control::{self, ControlConfig, ControlError, Readiness};
use crate::event::registry::RegistryClient;
use crate::graph::{GraphClient, GraphClientConfig, GraphUsage, LimiterRegistry};
use crate::log::{self, AnyLog, EmbeddedLogConfig, EventLog, KafkaLogConfig, LogError};
use crate::process::delete_guard::DeleteGuardHandle;
use crate::process::guard::PauseHandle;
use crate::process::hold::{HoldHandle, HoldRequests, grant};
use crate::process::{self, ProcessError, Processor, ProcessorConfig, ProcessorStats};
use crate::pull::{PollerConfig, PullError, StartMode};
use crate::telemetry::metrics as m;
use crate::telemetry::{self, TelemetryError};

/// Why a run stopped with an error. `is_retryable` tells a supervisor whether restarting the
/// process can help (a broker that was down) or an operator must act (a port in use).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("pipeline {pipeline}: cannot open its log: {source}")]
    Log {
        pipeline: String,
        #[source]
        source: LogError,
    },
    #[error("pipeline {pipeline}: capture stopped: {source}")]
    Capture {
        pipeline: String,
        #[source]
        source: CaptureError,
    },
    #[error("pipeline {pipeline}: the {stage} task ended abnormally: {message}")]
    Task {
        pipeline: String,
        stage: &'static str,
        message: String,
    },
    #[error("pipeline {pipeline}: push processor: {source}")]
    Process {
        pipeline: String,
        #[source]
        source: ProcessError,
    },
    #[error("pipeline {pipeline}: {source}")]
    Meta {
        pipeline: String,
        #[source]
        source: MetaError,
    },
    #[error("no pipeline to run")]
    Empty,
}

/// Set (to anything) to run without the ledger audit trail (`crate::process::audit`): only for
/// `ops/bench push`, which compares the push path with and without it. Row history stays empty.
pub const NO_AUDIT_ENV: &str = "SYNCBRIDGE_BENCH_NO_AUDIT";

/// Set by [`set_audit_disabled`]: the in-process equivalent of [`NO_AUDIT_ENV`].
static AUDIT_DISABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For benchmarks that compare the push path with and without the audit trail in one process:
/// pipelines started after this call record no audit records when `disabled`.
pub fn set_audit_disabled(disabled: bool) {
    AUDIT_DISABLED.store(disabled, std::sync::atomic::Ordering::Relaxed);
}

/// Environment variable with extra librdkafka client properties (`k=v,k=v`).
pub const KAFKA_PROPERTIES_ENV: &str = "SYNCBRIDGE_KAFKA_PROPERTIES";

/// Start-up attempts for provisioning when Graph or the database fail transiently.
const STARTUP_ATTEMPTS: u32 = 5;

/// Partitions of each table topic. Order is per key, so any count is correct; three leaves room
/// for a few processor instances per pipeline without a repartition.
pub const TABLE_TOPIC_PARTITIONS: i32 = 3;

impl RuntimeError {
    pub fn is_retryable(&self) -> bool {
        match self {
            RuntimeError::Control(e) => e.is_retryable(),
            RuntimeError::Log { source, .. } => source.is_retryable(),
            RuntimeError::Capture { source, .. } => source.is_retryable(),
            RuntimeError::Process { source, .. } => source.is_retryable(),
            RuntimeError::Meta { source, .. } => source.is_retryable(),
            RuntimeError::Task { .. } => true,
            RuntimeError::Telemetry(_) | RuntimeError::Empty => false,
        }
    }
}

/// One pipeline's running stages, in data-path order.
struct RunningPipeline {
    name: String,
    log: Arc<AnyLog>,
    capture_stop: CancellationToken,
    /// `None` once the task has been awaited (by `first_failure`).
    capture: Option<JoinHandle<Result<(), CaptureError>>>,
    /// Records capture's snapshot and re-snapshot runs; ends with capture.
    capture_runs: JoinHandle<()>,
    process_stop: CancellationToken,
    /// The push processor; `None` once awaited.
    process: Option<JoinHandle<Result<ProcessorStats, ProcessError>>>,
    /// Delta pollers of the lists that pull (they feed the return stream).
    pollers_stop: CancellationToken,
    pollers: Vec<JoinHandle<Result<(), PullError>>>,
    /// The stream run's heartbeat (hands the recorder back when stopped) and the counters.
    stream_stop: CancellationToken,
    stream: Option<JoinHandle<RunRecorder<AnyLog>>>,
    stats: tokio::sync::watch::Receiver<ProcessorStats>,
    /// What the pipeline's Graph client spent (all its processors, pollers included).
    usage: Arc<GraphUsage>,
    /// The run projector of this pipeline's runs topic.
    projector_stop: CancellationToken,
    projector: Option<JoinHandle<Result<u64, MetaError>>>,
    /// The `schedules:` jobs (stopped first when draining; a running job is cancelled).
    scheduler_stop: CancellationToken,
    scheduler: JoinHandle<()>,
    /// `notify:`: the conditions, their watcher and the sender (stopped last, so the
    /// notification of a failure goes out while draining).
    notifier: Option<control::notify::Notifier>,
    notify_stop: CancellationToken,
    notify: Vec<JoinHandle<()>>,
    /// Why the pipeline stopped, when a stage failed (the stream run's reason).
    failure: Option<String>,
}

/// Runs `pipelines` until `shutdown` is cancelled, then drains them in order and returns.
pub async fn run(
    pipelines: Vec<PipelineConfig>,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    run_reloading(pipelines, None, shutdown).await
}

/// Where a reload reads the pipelines again, and the requests to do it (`SIGHUP`, `--watch`).
#[derive(Debug)]
pub struct ReloadSource {
    /// The files `pipelines` were loaded from.
    pub files: Vec<PathBuf>,
    /// One message per request (its trigger's name).
    pub requests: tokio::sync::mpsc::Receiver<&'static str>,
    /// `run --allow-config-writes`: `PUT /pipelines/{name}/config` may write the files.
    pub allow_config_writes: bool,
}

/// [`run`], re-reading the pipeline files at each request of `reload` (see [`crate::reload`]).
pub async fn run_reloading(
    mut pipelines: Vec<PipelineConfig>,
    mut reload: Option<ReloadSource>,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let first = pipelines.first().ok_or(RuntimeError::Empty)?;
    let prometheus = telemetry::prometheus()?;

    // One control plane per process, on the first file's address.
    let listen: SocketAddr = first.control.listen;
    for p in &pipelines[1..] {
        if p.control.listen != listen {
            warn!(pipeline = %p.name, ignored = %p.control.listen, using = %listen,
                "one control plane per process: using the first pipeline's control.listen");
        }
        if p.control.tokens != first.control.tokens {
            warn!(pipeline = %p.name,
                "one control plane per process: using the first pipeline's control.tokens");
        }
    }
    let listener = control::bind(&ControlConfig {
        listen,
        tokens: first.control.tokens.clone(),
    })
    .await?;
    // Re-snapshot requests (→ capture), operator decisions on parked conflicts and resumes of
    // paused pipelines (→ processor): the control plane reaches each pipeline through these.
    let registries = control::Registries::default();
    let readiness = registries.readiness.clone();
    // Not a child of `shutdown`: the control plane outlives the drain.
    let control_stop = CancellationToken::new();
    let auth = control::Auth::new(&first.control.tokens);
    // Open is allowed on loopback only (checked by bind); said once so an operator knows.
    let access = if auth.is_open() {
        "open: no control.tokens, loopback only"
    } else {
        "bearer tokens"
    };
    let control_task = tokio::spawn(control::run(
        listener,
        control::router(registries.clone(), prometheus)
            .merge(control::catalog::routes(pipelines.clone())),
        auth,
        control_stop.clone(),
    ));
    info!(%listen, api = access, "control plane listening (/health, /ready, /metrics open)");
    // The mapping editor's reloads: answered in the loop below like SIGHUP, with the outcome.
    let (api_reload, mut api_reloads) = tokio::sync::mpsc::channel(1);
    if let Some(r) = &reload {
        // `load_files` makes one pipeline per file, in file order.
        let files = pipelines
            .iter()
            .map(|p| p.name.clone())
            .zip(r.files.clone());
        registries
            .config
            .enable(files.collect(), r.allow_config_writes, api_reload);
    }

    let mut running = Vec::with_capacity(pipelines.len());
    // One limiter per tenant, shared by every pipeline of the process (graph-api.md §8.3).
    let limiters = Arc::new(LimiterRegistry::new());
    let started = start_all(&pipelines, &registries, &limiters, &mut running).await;
    if let Err(e) = started {
        let _ = drain(running, &readiness).await;
        control_stop.cancel();
        let _ = control_task.await;
        return Err(e);
    }
    info!(
        pipelines = running.len(),
        "running; SIGINT/SIGTERM drains and exits, SIGHUP reloads the pipeline files"
    );
    m::init_reloads();

    let failure = loop {
        let (trigger, reply) = tokio::select! {
            _ = shutdown.cancelled() => break None,
            failed = first_failure(&mut running) => break Some(failed),
            trigger = next_reload(&mut reload) => (trigger, None),
            Some(req) = api_reloads.recv() => ("api", Some(req.reply)),
        };
        let files = &reload.as_ref().expect("a request came from it").files;
        let mut live = Live {
            pipelines: &mut pipelines,
            running: &mut running,
            registries: &registries,
            limiters: &limiters,
        };
        match reload_pipelines(trigger, files, &mut live).await {
            Err(e) => break Some(e),
            Ok(outcome) => {
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }
        }
    };
    let drained = drain(running, &readiness).await;
    control_stop.cancel();
    match control_task.await {
        Ok(result) => result?,
        Err(join) => warn!("control plane task ended abnormally: {join}"),
    }
    if let Some(e) = failure {
        return Err(e);
    }
    drained?;
    info!("stopped");
    Ok(())
}

/// Resolves when the first stage of any pipeline stops on its own (capture and the processor
/// retry transient failures themselves, so an ending task is an error an operator must see).
async fn first_failure(running: &mut [RunningPipeline]) -> RuntimeError {
    type Ended = (
        usize,
        &'static str,
        Result<Result<(), RuntimeError>, tokio::task::JoinError>,
    );
    let mut waiting: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = Ended> + Send + '_>>> =
        Vec::new();
    for (i, p) in running.iter_mut().enumerate() {
        let name = p.name.clone();
        if let Some(h) = p.capture.as_mut() {
            let name = name.clone();
            waiting.push(Box::pin(async move {
                let r = h.await.map(|r| {
                    r.map_err(|source| RuntimeError::Capture {
                        pipeline: name,
                        source,
                    })
                });
                (i, "capture", r)
            }));
        }
        if let Some(h) = p.process.as_mut() {
            waiting.push(Box::pin(async move {
                let r = h.await.map(|r| {
                    r.map(|_| ()).map_err(|source| RuntimeError::Process {
                        pipeline: name,
                        source,
                    })
                });
                (i, "process", r)
            }));
        }
    }
    if waiting.is_empty() {
        return std::future::pending().await;
    }
    let ((i, stage, result), _, rest) = futures::future::select_all(waiting).await;
    drop(rest);
    match stage {
        "capture" => running[i].capture = None,
        _ => running[i].process = None,
    }
    let pipeline = running[i].name.clone();
    let error = match result {
        Ok(Ok(())) => RuntimeError::Task {
            pipeline,
            stage,
            message: "stopped without being asked to".into(),
        },
        Ok(Err(e)) => e,
        Err(join) => RuntimeError::Task {
            pipeline,
            stage,
            message: join.to_string(),
        },
    };
    running[i].failure = Some(error.to_string());
    if let Some(n) = &running[i].notifier {
        n.raise(
            "pipeline_stopped",
            "pipeline stopped unexpectedly",
            &error.to_string(),
        );
    }
    error
}

/// The notifier of a pipeline with `notify:`, with its watcher and sender tasks.
/// Failovers reported by capture, each recorded as a `failover` run and notified (when `notify:`
/// is configured); the task ends with capture (the last sender dropped).
fn follow_failovers<L: EventLog + 'static>(
    p: &PipelineConfig,
    log: &Arc<L>,
    notifier: Option<control::notify::Notifier>,
) -> tokio::sync::mpsc::Sender<capture::failover::Failover> {
    // A failover is rare: a few queued reports are plenty; capture drops (and logs) any more.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<capture::failover::Failover>(8);
    let (log, pipeline) = (log.clone(), p.name.clone());
    let topic = meta::runs_topic(topic_prefix(p), &p.name);
    tokio::spawn(async move {
        let mut count = 0u64;
        while let Some(f) = rx.recv().await {
            count += 1;
            let subject = format!("{} -> {}", f.from, f.to);
            let how = if f.resnapshot {
                "no synchronised slot there: a new slot and a re-snapshot of every table"
            } else {
                "resumed from the synchronised failover slot"
            };
            if let Some(n) = &notifier {
                // One key per failover: each is its own event, none is "resolved".
                n.raise(
                    &format!("failover:{count}"),
                    &format!("source failover {subject}"),
                    how,
                );
            }
            let about = meta::runs::RunAbout {
                subject: Some(subject),
                by: Some("capture".into()),
                detail: Some(serde_json::json!({ "resnapshot": f.resnapshot })),
            };
            meta::runs::record_finished(
                log.clone(),
                topic.clone(),
                &pipeline,
                meta::runs::RunKind::Failover,
                about,
                None,
            )
            .await;
        }
    });
    tx
}

fn start_notify(
    p: &PipelineConfig,
    slot: &str,
    stats: &tokio::sync::watch::Receiver<ProcessorStats>,
    stop: &CancellationToken,
) -> (Option<control::notify::Notifier>, Vec<JoinHandle<()>>) {
    let Some(cfg) = &p.notify else {
        return (None, Vec::new());
    };
    let notifier = control::notify::Notifier::new(&p.name);
    let tasks = vec![
        tokio::spawn(control::notify::watch(
            notifier.clone(),
            cfg.clone(),
            stats.clone(),
            stop.clone(),
        )),
        tokio::spawn(control::notify::watch_slot(
            notifier.clone(),
            cfg.clone(),
            p.source.url.expose().to_string(),
            slot.to_string(),
            stop.clone(),
        )),
        tokio::spawn(control::notify::deliver(
            notifier.clone(),
            cfg.targets.clone(),
            stop.clone(),
        )),
    ];
    (Some(notifier), tasks)
}

async fn start_all(
    pipelines: &[PipelineConfig],
    registries: &control::Registries,
    limiters: &Arc<LimiterRegistry>,
    running: &mut Vec<RunningPipeline>,
) -> Result<(), RuntimeError> {
    for p in pipelines {
        registries.readiness.register(&p.name, "log");
        registries.readiness.register(&p.name, "capture");
        registries.readiness.register(&p.name, "process");
    }
    for p in pipelines {
        running.push(start_one(p, registries, limiters, None).await?);
    }
    Ok(())
}

/// Starts one pipeline's stages on `log` (kept open across a reload), or on its log opened now.
/// Opens the pipeline's log (embedded or Kafka) as its config says.
fn open_pipeline_log(p: &PipelineConfig) -> Result<Arc<AnyLog>, RuntimeError> {
    let log = open_log(p).map_err(|source| RuntimeError::Log {
        pipeline: p.name.clone(),
        source,
    })?;
    info!(pipeline = %p.name, log = %describe_log(&p.log), "log open");
    Ok(Arc::new(log))
}

/// Where capture appends: the pipeline's table topics, in the Confluent wire format when a
/// schema registry is configured.
fn log_sink(p: &PipelineConfig, log: &Arc<AnyLog>) -> LogSink<AnyLog> {
    let sink = LogSink::new(
        log.clone(),
        topic_prefix(p),
        &p.name,
        TABLE_TOPIC_PARTITIONS,
    );
    match &p.log {
        config::LogConfig::Kafka {
            schema_registry: Some(registry),
            ..
        } => {
            info!(pipeline = %p.name, registry = %registry.url, "Confluent wire format: schemas are registered with the schema registry");
            sink.with_schema_registry(RegistryClient::new(registry))
        }
        _ => sink,
    }
}

/// Repairs of the lists found at start, each a run: the vanished lists' items re-created
/// (`stale`), columns new to the mapping filled (`columns`), both by re-snapshots.
fn spawn_list_repairs(
    p: &PipelineConfig,
    stale: process::drift::StaleLedger,
    columns: process::provision::ColumnChanges,
    resnapshots: &ResnapshotHandle,
    log: &Arc<AnyLog>,
) {
    if !stale.is_empty() {
        tokio::spawn(process::drift::heal_vanished(
            stale,
            resnapshots.clone(),
            log.clone(),
            meta::runs_topic(topic_prefix(p), &p.name),
        ));
    }
    if !columns.is_empty() {
        info!(pipeline = %p.name, "lists follow the mapping: {}", columns.summary());
        tokio::spawn(process::provision::fill_added_columns(
            columns,
            resnapshots.clone(),
            log.clone(),
            meta::runs_topic(topic_prefix(p), &p.name),
        ));
    }
}

/// Each list's channel for operator resets of its delta link, by list id.
type ListResets =
    std::collections::HashMap<String, tokio::sync::mpsc::Sender<crate::pull::poller::ResetRequest>>;

/// Starts the delta pollers; each takes operator resets of its list's delta link (cursor
/// resets) on the channel returned under its list id. With `owned` (the Kafka log: other
/// processes may run the pipeline) a list's poller runs only while this process holds the list's
/// lock ([`crate::pull::owner`]); the embedded log is this process's alone.
fn spawn_pollers(
    pollers: Vec<(PollerConfig, Arc<GraphClient>)>,
    log: &Arc<AnyLog>,
    owned: Option<crate::pull::owner::Ownership>,
    stop: &CancellationToken,
) -> (Vec<JoinHandle<Result<(), PullError>>>, ListResets) {
    let mut list_resets = std::collections::HashMap::new();
    let tasks = pollers
        .into_iter()
        .map(|(cfg, client)| {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            list_resets.insert(cfg.list_id.clone(), tx);
            let (log, stop) = (log.clone(), stop.clone());
            match owned.clone() {
                Some(own) => tokio::spawn(crate::pull::owner::run_owned(
                    cfg,
                    client,
                    log,
                    Some(rx),
                    own,
                    stop,
                )),
                None => tokio::spawn(crate::pull::poller::run_resettable(
                    cfg,
                    client,
                    log,
                    Some(rx),
                    stop,
                )),
            }
        })
        .collect();
    (tasks, list_resets)
}

/// How the pollers of `p` share their lists with other processes: by lock on the source
/// database with the Kafka log, not at all with the embedded one (see [`spawn_pollers`]).
fn poller_ownership(
    p: &PipelineConfig,
    readiness: &Readiness,
) -> Option<crate::pull::owner::Ownership> {
    match p.log {
        config::LogConfig::Embedded { .. } => None,
        config::LogConfig::Kafka { .. } => Some(crate::pull::owner::Ownership {
            lock_url: p.source.url.expose().to_string(),
            retry: crate::pg::LOCK_RETRY_INTERVAL,
            readiness: readiness.clone(),
        }),
    }
}

async fn start_one(
    p: &PipelineConfig,
    registries: &control::Registries,
    limiters: &Arc<LimiterRegistry>,
    log: Option<Arc<AnyLog>>,
) -> Result<RunningPipeline, RuntimeError> {
    let readiness = &registries.readiness;
    let log = match log {
        Some(log) => log,
        None => open_pipeline_log(p)?,
    };
    readiness.set(&p.name, "log", true);

    // Lists are provisioned (or verified) before capture starts: a mapping that does not fit
    // the lists fails the run before a slot is created.
    let usage = Arc::new(GraphUsage::default());
    let (mut processor, pollers, columns) = prepare_processor(p, log.clone(), limiters, &usage)
        .await
        .map_err(|source| RuntimeError::Process {
            pipeline: p.name.clone(),
            source,
        })?;
    // Before the first write: entries naming a vanished list are dropped, healed below.
    let stale = processor
        .repair_stale_ledger()
        .await
        .map_err(|source| RuntimeError::Process {
            pipeline: p.name.clone(),
            source,
        })?;
    registries.conflicts.register(processor.conflict_handle());
    let processor_facts = processor.drift_facts();
    let (stats_tx, stats) = tokio::sync::watch::channel(ProcessorStats::default());
    processor.publish_stats(stats_tx.clone());
    processor.report_schema_pauses(
        registries.readiness.clone(),
        registries.config.path_of(&p.name),
    );
    let handle = PipelineHandle::new(
        &p.name,
        log.clone(),
        topic_prefix(p),
        processor.input_topics().to_vec(),
        process::sync_group(topic_prefix(p), &p.name),
        stats.clone(),
        usage.clone(),
        p.graph.ru_per_minute,
    );
    registries.pipelines.register(handle.clone());
    let pipeline_handle = handle.clone();
    m::init_pipeline(&p.name, p.sync.iter().any(|e| e.pull.enabled));
    let pause = PauseHandle::new(&p.name);
    registries.pauses.register(pause.clone());
    let process_stop = CancellationToken::new();
    let process_stop_run = process_stop.clone();
    // Ends with the processor's stop; the gauge keeps its last value.
    tokio::spawn(crate::control::pipelines::export_lag(
        handle,
        process_stop.clone(),
    ));
    let pollers_stop = CancellationToken::new();
    let capture_config = capture_config(p);
    if !capture_config.tables.is_empty() {
        capture_config
            .validate()
            .map_err(|source| RuntimeError::Capture {
                pipeline: p.name.clone(),
                source,
            })?;
    }
    let sink = log_sink(p, &log);
    let history =
        start_history(p, &log, registries)
            .await
            .map_err(|source| RuntimeError::Meta {
                pipeline: p.name.clone(),
                source,
            })?;
    let stream_stop = CancellationToken::new();
    let run_counts = {
        let (stats, usage) = (stats.clone(), usage.clone());
        move || RunCounts::of_stream(&stats.borrow(), usage.counts())
    };
    let stream = tokio::spawn(meta::runs::stream_heartbeat(
        history.recorder,
        run_counts,
        stream_stop.clone(),
        meta::runs::STREAM_UPDATE_INTERVAL,
    ));
    let capture_stop = CancellationToken::new();
    // Query sources are re-read by their poller (see `capture::query`).
    let tables = capture_config
        .tables
        .iter()
        .map(|t| t.qualified())
        .chain(
            p.sync
                .iter()
                .filter(|e| e.query.is_some())
                .map(|e| e.table.to_string()),
        )
        .collect();
    let (handle, requests) = ResnapshotHandle::channel(&p.name, tables);
    let resnapshots = handle.subscribe();
    spawn_list_repairs(p, stale, columns, &handle, &log);
    let notify_stop = CancellationToken::new();
    let (notifier, notify) = start_notify(p, &capture_config.slot_name, &stats, &notify_stop);
    let mut drift = drift_handle(p, &processor_facts, limiters, registries, &handle, &log)?;
    if let (Some(n), Some(cfg)) = (&notifier, &p.notify) {
        drift = drift.with_notifier(n.clone(), cfg.drift_threshold);
    }
    registries.drift.register(drift.clone());
    let delete_guard = DeleteGuardHandle::new(&p.name, &p.guard)
        .with_readiness(readiness.clone())
        .with_notifier(notifier.clone())
        .with_snapshots(handle.clone());
    registries.guards.register(delete_guard.clone());
    processor.set_delete_guard(delete_guard);
    let scheduler_stop = CancellationToken::new();
    let scheduler = tokio::spawn(control::schedule::run(
        control::schedule::Scheduler {
            pipeline: p.name.clone(),
            schedules: p.schedules.clone(),
            db: meta::MetaDb::new(p.control.meta_url.expose()),
            log: log.clone(),
            runs_topic: meta::runs_topic(topic_prefix(p), &p.name),
            runners: control::schedule::JobRunners::builtin(handle.clone(), pipeline_handle)
                .with_drift(drift),
            notifier: notifier.clone(),
        },
        scheduler_stop.clone(),
    ));
    registries.snapshots.register(handle);
    let (progress, snapshots) = ObservedProgress::new(FileProgress::new(
        &capture_config.state_dir,
        &capture_config.slot_name,
    ));
    // Stopped with capture, awaited right after it.
    let capture_runs = tokio::spawn(meta::capture_runs::follow(
        meta::capture_runs::CaptureRuns {
            log: log.clone(),
            topic: meta::runs_topic(topic_prefix(p), &p.name),
            pipeline: p.name.clone(),
        },
        snapshots,
        resnapshots,
        capture_stop.clone(),
    ));
    let slot = capture_config.slot_name.clone();
    let mut capture_config = capture_config;
    if !capture_config.failover_urls.is_empty() {
        capture_config.failover_reports = Some(follow_failovers(p, &log, notifier.clone()));
    }
    // Replication for the tables (none when every entry is a query), polling for the queries;
    // each takes the re-snapshot requests for its own sources.
    let queries = capture::query::QueryPollConfig::new(&p.name, &p.source, &p.sync, state_dir(p));
    let (table_requests, query_requests) =
        match (capture_config.tables.is_empty(), queries.entries.is_empty()) {
            (false, false) => {
                let (t, q) = requests.split(config::is_query_table);
                (Some(t), Some(q))
            }
            (true, _) => (None, Some(requests)),
            (false, true) => (Some(requests), None),
        };
    let replication = (!capture_config.tables.is_empty()).then(|| {
        tokio::spawn(capture::run_with_control(
            capture_config,
            sink,
            progress,
            table_requests,
            capture_stop.clone(),
        ))
    });
    let polling = (!queries.entries.is_empty()).then(|| {
        tokio::spawn(capture::query::run(
            queries,
            log_sink(p, &log),
            query_requests,
            capture_stop.clone(),
        ))
    });
    let capture = tokio::spawn(run_inputs(replication, polling, capture_stop.clone()));
    // Started, not yet caught up: capture reconnects on its own and reports failures by ending.
    readiness.set(&p.name, "capture", true);
    let owned = poller_ownership(p, readiness);
    let (poller_tasks, list_resets) = spawn_pollers(pollers, &log, owned, &pollers_stop);
    let (hold, holds) = HoldHandle::channel(&p.name);
    registries
        .cursors
        .register(control::cursors::CursorHandle::new(cursor_spec(
            p,
            &log,
            &processor,
            slot,
            list_resets,
            hold,
            registries,
        )));
    let started = RunningPipeline {
        name: p.name.clone(),
        log: log.clone(),
        capture_stop,
        capture: Some(capture),
        capture_runs,
        process_stop,
        process: Some(tokio::spawn(supervise_processor(
            processor,
            Supervision {
                pipeline: p.clone(),
                log: log.clone(),
                limiters: limiters.clone(),
                registries: registries.clone(),
                pause,
                stats: stats_tx,
                usage: usage.clone(),
            },
            holds,
            process_stop_run,
        ))),
        pollers_stop: pollers_stop.clone(),
        pollers: poller_tasks,
        stream_stop,
        stream: Some(stream),
        stats,
        usage,
        projector_stop: history.projector_stop,
        projector: Some(history.projector),
        scheduler_stop,
        scheduler,
        notifier,
        notify_stop,
        notify,
        failure: None,
    };
    readiness.set(&p.name, "process", true);
    Ok(started)
}

/// What the control plane's cursor routes need of a pipeline: its slot, consumer groups (the
/// processor's own are stopped through `hold` for a reset), lists with their pollers' reset
/// channels (by list id), budget and topics.
fn cursor_spec(
    p: &PipelineConfig,
    log: &Arc<AnyLog>,
    processor: &Processor<AnyLog>,
    slot: String,
    mut list_resets: ListResets,
    hold: HoldHandle,
    registries: &control::Registries,
) -> control::cursors::CursorSpec {
    use control::cursors::{GroupSpec, ListSpec};
    let prefix = topic_prefix(p);
    let mut groups = vec![GroupSpec {
        role: "sync",
        name: process::sync_group(prefix, &p.name),
        topics: processor.topics.clone(),
        stage: Some("process"),
    }];
    if let Some(t) = &processor.pull_topic {
        groups.push(GroupSpec {
            role: "return",
            name: process::return_group(prefix, &p.name),
            topics: vec![t.clone()],
            stage: Some("process"),
        });
    }
    groups.push(GroupSpec {
        role: "dlq-replay",
        name: process::dlq::replay_group(prefix, &p.name),
        topics: vec![process::dlq::dlq_topic(prefix, &p.name)],
        stage: None,
    });
    let mut lists: Vec<ListSpec> = processor
        .targets
        .lists
        .values()
        .map(|t| ListSpec {
            name: t.display_name.clone(),
            id: t.id.clone(),
            reset: list_resets.remove(&t.id),
        })
        .collect();
    lists.sort_by(|a, b| a.name.cmp(&b.name));
    let pulls = p.sync.iter().any(|e| e.pull.enabled);
    control::cursors::CursorSpec {
        pipeline: p.name.clone(),
        log: log.clone(),
        source_url: p.source.url.expose().to_string(),
        slot,
        groups,
        lists,
        hold,
        ru_per_minute: p.graph.ru_per_minute,
        // Writers get what the delta pollers' reserve leaves (see `prepare_processor`).
        writer_share: if pulls {
            1.0 - crate::graph::limiter::DEFAULT_DELTA_RESERVE
        } else {
            1.0
        },
        runs_topic: meta::runs_topic(prefix, &p.name),
        ledger_topic: process::ledger_topic(prefix, &p.name),
        cursors_topic: crate::pull::poller::cursors_topic(prefix, &p.name),
        meta: Some(registries.meta.register(p.control.meta_url.expose())),
    }
}

/// What the processor's supervisor needs to rebuild it after a pause.
struct Supervision {
    pipeline: PipelineConfig,
    log: Arc<AnyLog>,
    limiters: Arc<LimiterRegistry>,
    registries: control::Registries,
    pause: PauseHandle,
    /// The stream run's counters (a rebuilt processor continues them).
    stats: tokio::sync::watch::Sender<ProcessorStats>,
    usage: Arc<GraphUsage>,
}

/// Runs the processor; when it pauses itself ([`ProcessError::Paused`]: a dead-letter storm, a
/// schema that cannot be had) the pipeline is marked not ready with the reason and waits for the
/// operator's resume, then a new processor starts from the committed offsets (nothing past the
/// first failing event was acknowledged, so every held event is processed again). Lists are
/// verified again on the way, so a fix made to a list is seen. A hold (a cursor reset, see
/// [`crate::process::hold`]) stops the processor as a shutdown would and restarts it from the
/// committed offsets once released; a hold while paused leaves the pipeline paused.
async fn supervise_processor(
    mut processor: Processor<AnyLog>,
    s: Supervision,
    mut holds: HoldRequests,
    stop: CancellationToken,
) -> Result<ProcessorStats, ProcessError> {
    let name = s.pipeline.name.clone();
    loop {
        let run_stop = stop.child_token();
        let (result, hold) = {
            let run = processor.run(run_stop.clone());
            tokio::pin!(run);
            tokio::select! {
                r = &mut run => (r, None),
                request = holds.next() => {
                    info!(pipeline = %name, "stopping the processor for a cursor reset");
                    run_stop.cancel();
                    (run.await, Some(request))
                }
            }
        };
        let paused = match result {
            Err(ProcessError::Paused(p)) => Some(p),
            Ok(_) if hold.is_some() => None,
            other => return other,
        };
        if let Some(request) = hold {
            s.registries.readiness.set_not_ready(
                &name,
                "process",
                "stopped for a cursor reset".into(),
            );
            grant(request, &stop).await;
        }
        if let Some(paused) = paused
            && !wait_for_resume(&s, paused, &mut holds, &stop).await
        {
            return Ok(ProcessorStats::default());
        }
        if stop.is_cancelled() {
            return Ok(ProcessorStats::default());
        }
        info!(pipeline = %name, "restarting the processor from its committed offsets");
        processor = loop {
            match prepare_processor(&s.pipeline, s.log.clone(), &s.limiters, &s.usage).await {
                // The pollers of the first start keep running; only the processor is new.
                Ok((p, _pollers, _columns)) => break p,
                Err(e) if e.is_retryable() => {
                    warn!(pipeline = %name, "restarting the processor failed, retrying: {e}");
                    tokio::select! {
                        () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                        () = stop.cancelled() => return Ok(ProcessorStats::default()),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        s.registries.conflicts.register(processor.conflict_handle());
        if let Some(h) = s.registries.guards.get(&name) {
            processor.set_delete_guard(h);
        }
        processor.publish_stats(s.stats.clone());
        processor.report_schema_pauses(
            s.registries.readiness.clone(),
            s.registries.config.path_of(&name),
        );
        s.registries.readiness.set(&name, "process", true);
    }
}

/// Marks the pipeline paused and waits for the operator's resume (true) or `stop` (false).
/// Holds asked for meanwhile are granted at once: the processor is stopped already.
async fn wait_for_resume(
    s: &Supervision,
    paused: crate::process::guard::Paused,
    holds: &mut HoldRequests,
    stop: &CancellationToken,
) -> bool {
    let name = &s.pipeline.name;
    error!(pipeline = %name, kind = %paused.kind, at = ?paused.at,
        "pipeline paused: {}; fix the cause, then `syncbridge resume`", paused.reason);
    metrics::gauge!(m::PIPELINE_PAUSED, "pipeline" => name.clone(), "kind" => paused.kind.clone())
        .set(1.0);
    metrics::counter!(m::PIPELINE_PAUSES_TOTAL, "pipeline" => name.clone(), "kind" => paused.kind.clone())
        .increment(1);
    s.registries.readiness.set_not_ready(
        name,
        "process",
        format!("paused ({}): {}", paused.kind, paused.reason),
    );
    let kind = paused.kind.clone();
    s.pause.pause(paused);
    loop {
        tokio::select! {
            () = s.pause.resumed() => break,
            () = stop.cancelled() => return false,
            request = holds.next() => grant(request, stop).await,
        }
    }
    metrics::gauge!(m::PIPELINE_PAUSED, "pipeline" => name.clone(), "kind" => kind).set(0.0);
    info!(pipeline = %name, "resumed by the operator");
    true
}

/// A pipeline's run history, started: the projector task and the stream run's recorder.
struct History {
    projector_stop: CancellationToken,
    projector: JoinHandle<Result<u64, MetaError>>,
    recorder: RunRecorder<AnyLog>,
}

/// How long a start waits for the projector to apply the runs already in the log (it must
/// have seen a dead process's runs to mark them failed).
const PROJECTOR_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(60);

/// Migrates the meta-store, catches its projection up with the runs topic, marks the runs of a
/// process that ended failed, starts the projectors (runs, audit and drift reports, one task)
/// and this process's stream run.
async fn start_history(
    p: &PipelineConfig,
    log: &Arc<AnyLog>,
    registries: &control::Registries,
) -> Result<History, MetaError> {
    let url = p.control.meta_url.expose();
    meta::migrate::migrate(url).await?;
    let tables = p.sync.iter().map(|e| e.table.to_string()).collect();
    registries.meta.register_pipeline(&p.name, url, tables);
    // A connection of the projector's own: it wraps each record in BEGIN/COMMIT, which a
    // connection shared with the API's reads would interleave with.
    let db = meta::MetaDb::new(url);
    let topic = meta::runs_topic(topic_prefix(p), &p.name);
    meta::runs::ensure_runs_topic(&**log, &topic).await?;
    // The embedded log is locked to this process: any run still `running` is a dead one's.
    let exclusive = matches!(p.log, config::LogConfig::Embedded { .. });
    let mut projector = Projector::open(
        log.clone(),
        topic.clone(),
        &p.name,
        db.clone(),
        !exclusive,
        Projection::Runs,
    )
    .await?;
    projector.catch_up(PROJECTOR_CATCH_UP).await?;
    meta::projector::fail_orphans(&**log, &topic, &db, &p.name, exclusive).await?;
    // The audit projector is not waited for: its backlog (one record per row change, the whole
    // topic after the schema was dropped) must not delay the start.
    let audit_topic = process::audit::audit_topic(topic_prefix(p), &p.name);
    log.ensure_topic(&log::TopicSpec::new(
        audit_topic.clone(),
        process::audit::AUDIT_PARTITIONS,
    ))
    .await?;
    let audit = Projector::open(
        log.clone(),
        audit_topic,
        &p.name,
        meta::MetaDb::new(url),
        !exclusive,
        Projection::Audit,
    )
    .await?
    .with_retention(p.control.audit_retention);
    let drift_topic = meta::drift::drift_topic(topic_prefix(p), &p.name);
    meta::drift::ensure_drift_topic(&**log, &drift_topic).await?;
    let drift = Projector::open(
        log.clone(),
        drift_topic,
        &p.name,
        meta::MetaDb::new(url),
        !exclusive,
        Projection::Drift,
    )
    .await?;
    let projector_stop = CancellationToken::new();
    let (stop, sweep) = (projector_stop.clone(), !exclusive);
    let projector = tokio::spawn(async move {
        let (runs, audit, drift) = tokio::join!(
            projector.run(stop.clone(), sweep),
            audit.run(stop.clone(), false),
            drift.run(stop, false)
        );
        Ok::<u64, MetaError>(runs? + audit? + drift?)
    });
    let recorder = RunRecorder::start(log.clone(), topic, &p.name, RunKind::Stream).await?;
    info!(pipeline = %p.name, run = %recorder.run_id(), "stream run started");
    Ok(History {
        projector_stop,
        projector,
        recorder,
    })
}

/// Appends the stream run's final event (after the processor stopped), then stops the projector
/// once it has written it.
async fn finish_history(
    name: &str,
    stream_stop: CancellationToken,
    stream: Option<JoinHandle<RunRecorder<AnyLog>>>,
    counts: RunCounts,
    failure: Option<String>,
    projector_stop: CancellationToken,
    projector: Option<JoinHandle<Result<u64, MetaError>>>,
) {
    stream_stop.cancel();
    if let Some(handle) = stream {
        match handle.await {
            Ok(mut recorder) => {
                let status = if failure.is_some() {
                    RunStatus::Failed
                } else {
                    RunStatus::Succeeded
                };
                match recorder.finish(status, counts, failure).await {
                    Ok(()) => {
                        info!(pipeline = %name, run = %recorder.run_id(), status = status.as_str(), "stream run ended");
                    }
                    Err(e) => {
                        warn!(pipeline = %name, run = %recorder.run_id(), "cannot record the end of the stream run (the next start marks it failed): {e}");
                    }
                }
            }
            Err(join) => warn!(pipeline = %name, "stream run task: {join}"),
        }
    }
    projector_stop.cancel();
    if let Some(handle) = projector {
        match handle.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(pipeline = %name, "run projector ended with: {e}"),
            Err(join) => warn!(pipeline = %name, "run projector task: {join}"),
        }
    }
}

/// What [`prepare_processor`] hands over: the processor, the delta pollers of its lists and what
/// provisioning changed on existing lists.
type Prepared = (
    Processor<AnyLog>,
    Vec<(PollerConfig, Arc<GraphClient>)>,
    process::provision::ColumnChanges,
);

/// Graph client, catalog facts, provisioning and the processor of one pipeline. Transient Graph
/// or database failures at start-up are retried a few times (a tenant or database that is
/// briefly unreachable should not need an operator); a list mismatch fails at once.
async fn prepare_processor(
    p: &PipelineConfig,
    log: Arc<AnyLog>,
    limiters: &LimiterRegistry,
    usage: &Arc<GraphUsage>,
) -> Result<Prepared, ProcessError> {
    let mut graph = GraphClientConfig::from(&p.graph);
    if !p.sync.iter().any(|e| e.pull.enabled) {
        // No delta poller will use the reserved share: writers may spend the whole budget. (The
        // first pipeline of a tenant sets its limiter; pipelines sharing a tenant share it.)
        graph.limiter.delta_reserve = 0.0;
    }
    let client = GraphClient::counted(graph, limiters, usage.clone())?;
    let mut attempt = 0;
    let (targets, facts) = loop {
        attempt += 1;
        let result = async {
            let facts = process::provision::table_facts(p).await?;
            let not_null = facts
                .iter()
                .map(|(t, f)| (t.clone(), f.not_null.clone()))
                .collect();
            let targets = process::provision(&client, p, &not_null).await?;
            Ok::<_, ProcessError>((targets, facts))
        }
        .await;
        match result {
            Ok(t) => break t,
            Err(e) if e.is_retryable() && attempt < STARTUP_ATTEMPTS => {
                warn!(pipeline = %p.name, attempt, "provisioning failed, retrying: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1 << attempt.min(4))).await;
            }
            Err(e) => return Err(e),
        }
    };
    let mut config = ProcessorConfig::new(
        p.clone(),
        topic_prefix(p),
        TABLE_TOPIC_PARTITIONS,
        state_dir(p),
    );
    // Only `ops/bench push` turns it off, to print what the audit trail costs.
    config.audit = std::env::var(NO_AUDIT_ENV).is_err()
        && !AUDIT_DISABLED.load(std::sync::atomic::Ordering::Relaxed);
    // One delta poller per list of every entry that pulls. A list this run created is empty, so
    // its poller starts from `token=latest`; an existing list is read in full once (items people
    // made before become rows; ours are recognised by the ledger) when no cursor is stored yet.
    let shared = Arc::new(client.clone());
    let mut pollers = Vec::new();
    for e in p.sync.iter().filter(|e| e.pull.enabled) {
        for list in e.lists() {
            let Some(t) = targets.lists.get(list) else {
                continue;
            };
            let start = if t.created {
                StartMode::Latest
            } else {
                StartMode::Full
            };
            let cfg = PollerConfig::new(
                topic_prefix(p),
                &p.name,
                &targets.site_id,
                &t.id,
                list,
                std::time::Duration::from_millis(e.pull.interval_ms),
                start,
            );
            pollers.push((cfg, shared.clone()));
        }
    }
    let columns = targets.changes.clone();
    let processor = Processor::new(config, log, client, targets, facts).await?;
    Ok((processor, pollers, columns))
}

/// The pipeline's input stage: replication and the query poller, each optional; either one
/// failing stops the other (the stage ends as one, with the first failure).
async fn run_inputs(
    replication: Option<JoinHandle<Result<(), CaptureError>>>,
    polling: Option<JoinHandle<Result<(), capture::query::QueryError>>>,
    stop: CancellationToken,
) -> Result<(), CaptureError> {
    let joined = |what: &str, e: tokio::task::JoinError| {
        CaptureError::Protocol(format!("{what} task ended abnormally: {e}"))
    };
    let stop_on_err = |r: Result<(), CaptureError>| {
        if r.is_err() {
            stop.cancel();
        }
        r
    };
    let replication = async {
        match replication {
            Some(h) => stop_on_err(h.await.unwrap_or_else(|e| Err(joined("capture", e)))),
            None => Ok(()),
        }
    };
    let polling = async {
        match polling {
            Some(h) => stop_on_err(match h.await {
                Ok(r) => r.map_err(|e| CaptureError::Query(Box::new(e))),
                Err(e) => Err(joined("query poller", e)),
            }),
            None => Ok(()),
        }
    };
    let (a, b) = tokio::join!(replication, polling);
    a.and(b)
}

/// Replication of the pipeline's tables (query sources are polled instead, see [`run_inputs`]).
fn capture_config(p: &PipelineConfig) -> CaptureConfig {
    let tables = p
        .sync
        .iter()
        .filter(|s| s.query.is_none())
        .map(|s| {
            let spec = TableSpec::parse(&s.table.to_string());
            match &s.key {
                Some(key) => spec.with_key(key.clone()),
                None => spec,
            }
        })
        .collect();
    let mut config = CaptureConfig::new(&p.name, p.source.url.expose(), tables, state_dir(p));
    if !p.source.standbys.is_empty() {
        config.failover_urls = p
            .source
            .instances()
            .map(|u| u.expose().to_owned())
            .collect();
    }
    config
}

/// Where a pipeline keeps local state besides the log (snapshot progress, the ledger):
/// beside the embedded log, or under the default state folder with Kafka.
fn state_dir(p: &PipelineConfig) -> PathBuf {
    match &p.log {
        config::LogConfig::Embedded { path } => {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push("-state");
            path.with_file_name(name)
        }
        config::LogConfig::Kafka { .. } => {
            PathBuf::from(config::DEFAULT_EMBEDDED_LOG_DIR).join(format!("{}-state", p.name))
        }
    }
}

/// Opens a pipeline's log as `run` would (for CLI tools such as `syncbridge dlq`).
pub fn open_log(p: &PipelineConfig) -> Result<AnyLog, LogError> {
    AnyLog::open(log_config(p))
}

/// Logical topic names are `<prefix>.<pipeline>.…` on both logs.
pub fn topic_prefix(p: &PipelineConfig) -> &str {
    match &p.log {
        config::LogConfig::Embedded { .. } => config::DEFAULT_TOPIC_PREFIX,
        config::LogConfig::Kafka { topic_prefix, .. } => topic_prefix,
    }
}

/// The next reload request; never when there is no reload source (or its senders are gone).
async fn next_reload(reload: &mut Option<ReloadSource>) -> &'static str {
    if let Some(r) = reload
        && let Some(trigger) = r.requests.recv().await
    {
        return trigger;
    }
    std::future::pending().await
}

/// What a reload changes: the running pipelines and their configs, both in start order.
struct Live<'a> {
    pipelines: &'a mut Vec<PipelineConfig>,
    running: &'a mut Vec<RunningPipeline>,
    registries: &'a control::Registries,
    limiters: &'a Arc<LimiterRegistry>,
}

/// Re-reads `files` and restarts each pipeline whose config changed (see [`crate::reload`]). A
/// file with a problem or a change that cannot apply live changes nothing. `Err` only when a
/// pipeline could start neither with its new config nor again with its old one.
async fn reload_pipelines(
    trigger: &'static str,
    files: &[PathBuf],
    live: &mut Live<'_>,
) -> Result<ReloadOutcome, RuntimeError> {
    let mut outcome = ReloadOutcome {
        outcome: "applied".into(),
        changed: BTreeMap::new(),
        error: None,
    };
    let plan = match crate::reload::plan(files, live.pipelines) {
        Ok(plan) => plan,
        Err(e) => {
            error!(trigger, "reload: {e}");
            m::count_reload(e.outcome());
            outcome.outcome = e.outcome().into();
            outcome.error = Some(e.to_string());
            return Ok(outcome);
        }
    };
    if plan.is_empty() {
        info!(trigger, "reload: no pipeline changed");
        m::count_reload("unchanged");
        outcome.outcome = "unchanged".into();
    }
    for change in plan {
        let (name, changed) = (change.config.name.clone(), change.changed.clone());
        if let Some(failure) = restart_pipeline(trigger, change, live).await? {
            outcome.outcome = "failed".into();
            outcome.error = Some(format!("{name}: {failure}"));
        }
        outcome.changed.insert(name, changed);
    }
    Ok(outcome)
}

/// Drains one pipeline in order and starts it again in this process with the changed config
/// (its log stays open); when that fails, starts it again with the config it had. Records a
/// `reload` run either way, and answers why the new config did not start, if it did not.
async fn restart_pipeline(
    trigger: &'static str,
    change: crate::reload::PipelineChange,
    live: &mut Live<'_>,
) -> Result<Option<String>, RuntimeError> {
    let name = change.config.name.clone();
    let Some(i) = live.running.iter().position(|r| r.name == name) else {
        return Ok(None);
    };
    info!(pipeline = %name, trigger, changed = ?change.changed, "reload: restarting the pipeline with its new config");
    let (log, drained) = drain_one(live.running.remove(i), &live.registries.readiness).await;
    if let Err(e) = drained {
        warn!(pipeline = %name, "reload: the drain ended with: {e}");
    }
    let old = live.pipelines[i].clone();
    if old.graph != change.config.graph {
        // A new budget or sign-in takes a new limiter (see `LimiterRegistry::forget`).
        live.limiters.forget(&old.graph.tenant);
    }
    let (started, failure) = match start_changed(&change, live, &log).await {
        Ok(started) => {
            live.pipelines[i] = change.config.clone();
            (started, None)
        }
        Err(e) => {
            error!(pipeline = %name, "reload: the new config does not start, starting the old one again: {e}");
            let started = start_one(&old, live.registries, live.limiters, Some(log.clone()))
                .await
                .inspect_err(|e| error!(pipeline = %name, "reload: the old config does not start either: {e}"))?;
            (started, Some(e))
        }
    };
    live.running.insert(i, started);
    m::count_reload(if failure.is_some() {
        "failed"
    } else {
        "applied"
    });
    let topic = meta::runs_topic(topic_prefix(&change.config), &name);
    crate::reload::record_run(log, topic, &name, trigger, &change, failure.clone()).await;
    Ok(failure)
}

/// Starts a drained pipeline with its changed config: its new tables are added to the
/// publication first (now that capture is stopped, so it never reads a table it does not know).
async fn start_changed(
    change: &crate::reload::PipelineChange,
    live: &Live<'_>,
    log: &Arc<AnyLog>,
) -> Result<RunningPipeline, String> {
    let publication = capture_config(&change.config).publication_name;
    crate::reload::add_to_publication(&change.config, &publication, &change.new_tables)
        .await
        .map_err(|e| e.to_string())?;
    start_one(
        &change.config,
        live.registries,
        live.limiters,
        Some(log.clone()),
    )
    .await
    .map_err(|e| e.to_string())
}

/// Stops pipelines in the order they were started; within a pipeline, inputs before their
/// consumer: capture first (it acknowledges what is durable and stops reading), then the delta
/// pollers, then the processor, and the log last.
async fn drain(running: Vec<RunningPipeline>, readiness: &Readiness) -> Result<(), RuntimeError> {
    let mut first_error = None;
    for p in running {
        let (log, drained) = drain_one(p, readiness).await;
        if let Err(e) = drained {
            first_error.get_or_insert(e);
        }
        // The last reference: dropping flushes and closes the log.
        drop(log);
    }
    first_error.map_or(Ok(()), Err)
}

/// Drains one pipeline (see [`drain`]) and hands its log back, still open: a reload starts the
/// pipeline again on it.
async fn drain_one(
    p: RunningPipeline,
    readiness: &Readiness,
) -> (Arc<AnyLog>, Result<(), RuntimeError>) {
    let mut first_error = None;
    info!(pipeline = %p.name, "draining");
    // Scheduled jobs first: they drive the stages below.
    p.scheduler_stop.cancel();
    if let Err(join) = p.scheduler.await {
        warn!(pipeline = %p.name, "scheduler task: {join}");
    }
    p.capture_stop.cancel();
    if let Some(handle) = p.capture {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(pipeline = %p.name, "capture ended with: {e}");
                first_error.get_or_insert(RuntimeError::Capture {
                    pipeline: p.name.clone(),
                    source: e,
                });
            }
            Err(join) => warn!(pipeline = %p.name, "capture task: {join}"),
        }
    }
    if let Err(join) = p.capture_runs.await {
        warn!(pipeline = %p.name, "capture runs task: {join}");
    }
    readiness.set(&p.name, "capture", false);
    // Then the pollers (the other input of the processor).
    p.pollers_stop.cancel();
    for h in p.pollers {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(pipeline = %p.name, "delta poller ended with: {e}"),
            Err(join) => warn!(pipeline = %p.name, "delta poller task: {join}"),
        }
    }
    // Then the processor: it flushes what it has read and commits, and stops.
    p.process_stop.cancel();
    let mut failure = p.failure;
    if let Some(handle) = p.process {
        match handle.await {
            Ok(Ok(stats)) => info!(pipeline = %p.name, ?stats, "push processor drained"),
            Ok(Err(e)) => {
                error!(pipeline = %p.name, "push processor ended with: {e}");
                failure.get_or_insert(e.to_string());
                first_error.get_or_insert(RuntimeError::Process {
                    pipeline: p.name.clone(),
                    source: e,
                });
            }
            Err(join) => {
                warn!(pipeline = %p.name, "push processor task: {join}");
                failure.get_or_insert(join.to_string());
            }
        }
    }
    // Then the run history, which reads the processor's final counts.
    let counts = RunCounts::of_stream(&p.stats.borrow(), p.usage.counts());
    finish_history(
        &p.name,
        p.stream_stop,
        p.stream,
        counts,
        failure,
        p.projector_stop,
        p.projector,
    )
    .await;
    readiness.set(&p.name, "process", false);
    readiness.set(&p.name, "log", false);
    p.notify_stop.cancel();
    for h in p.notify {
        if let Err(join) = h.await {
            warn!(pipeline = %p.name, "notification task: {join}");
        }
    }
    (p.log, first_error.map_or(Ok(()), Err))
}

fn log_config(p: &PipelineConfig) -> log::LogConfig {
    match &p.log {
        config::LogConfig::Embedded { path } => {
            log::LogConfig::Embedded(EmbeddedLogConfig::new(path.clone()))
        }
        config::LogConfig::Kafka {
            brokers,
            topic_prefix,
            // Used by the capture sink (Confluent wire format), not by the log client.
            schema_registry: _,
        } => {
            let mut kafka = KafkaLogConfig::new(brokers.join(","));
            // The capture sink already names topics `<prefix>.<pipeline>.…` (`topic_prefix`);
            // a client-side prefix on top would double it.
            let _ = topic_prefix;
            kafka.topic_prefix = String::new();
            // Extra librdkafka properties for every client (security, tuning): `k=v` pairs
            // separated by commas. Not needed for the tansu test broker: the log probes it.
            if let Ok(props) = std::env::var(KAFKA_PROPERTIES_ENV) {
                for kv in props.split(',').filter(|kv| !kv.trim().is_empty()) {
                    if let Some((k, v)) = kv.split_once('=') {
                        kafka
                            .extra
                            .push((k.trim().to_string(), v.trim().to_string()));
                    } else {
                        warn!(property = %kv, "ignoring {KAFKA_PROPERTIES_ENV} entry without '='");
                    }
                }
            }
            log::LogConfig::Kafka(kafka)
        }
    }
}

fn describe_log(log: &config::LogConfig) -> String {
    match log {
        config::LogConfig::Embedded { path } => format!("embedded at {}", path.display()),
        config::LogConfig::Kafka { brokers, .. } => format!("kafka at {}", brokers.join(",")),
    }
}

/// The drift check's handle of a pipeline: its own Graph client on the tenant's limiter (so
/// what checks spend is counted apart from the writers), the processor's targets and key columns.
fn drift_handle(
    p: &PipelineConfig,
    facts: &process::drift::ProcessorFacts,
    limiters: &Arc<LimiterRegistry>,
    registries: &control::Registries,
    snapshots: &ResnapshotHandle,
    log: &Arc<AnyLog>,
) -> Result<process::drift::DriftHandle, RuntimeError> {
    let usage = Arc::new(GraphUsage::default());
    let client = GraphClient::counted(GraphClientConfig::from(&p.graph), limiters, usage.clone())
        .map_err(|e| RuntimeError::Process {
        pipeline: p.name.clone(),
        source: e.into(),
    })?;
    Ok(process::drift::DriftHandle::new(
        p.clone(),
        client,
        usage,
        facts.clone(),
        registries.conflicts.clone(),
        snapshots.clone(),
        log.clone(),
        meta::runs_topic(topic_prefix(p), &p.name),
    )
    .with_store(
        registries.meta.register(p.control.meta_url.expose()),
        meta::drift::drift_topic(topic_prefix(p), &p.name),
    ))
}
