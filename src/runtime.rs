//! Runs pipelines inside one process: one cancellation tree, stages started in data-path order
//! (log → capture → process → write → return) and drained in that same order on shutdown, so
//! nothing new enters a stage after the one before it has stopped. The control plane starts
//! first (a taken port fails the run before any work begins) and stops last (`/health` stays
//! up while draining).
//!
//! Today the stages are the control plane and each pipeline's log; capture, processors and
//! writers join here as they land.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, PipelineConfig};
use crate::control::{self, ControlConfig, ControlError, Readiness};
use crate::log::{self, AnyLog, EmbeddedLogConfig, KafkaLogConfig, LogError};
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
    #[error("no pipeline to run")]
    Empty,
}

impl RuntimeError {
    pub fn is_retryable(&self) -> bool {
        match self {
            RuntimeError::Control(e) => e.is_retryable(),
            RuntimeError::Log { source, .. } => source.is_retryable(),
            RuntimeError::Telemetry(_) | RuntimeError::Empty => false,
        }
    }
}

/// One pipeline's running stages, in data-path order.
struct RunningPipeline {
    name: String,
    log: AnyLog,
}

/// Runs `pipelines` until `shutdown` is cancelled, then drains them in order and returns.
pub async fn run(
    pipelines: Vec<PipelineConfig>,
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
    }
    let listener = control::bind(&ControlConfig { listen }).await?;
    let readiness = Readiness::default();
    // Not a child of `shutdown`: the control plane outlives the drain.
    let control_stop = CancellationToken::new();
    let control_task = tokio::spawn(control::run(
        listener,
        readiness.clone(),
        prometheus,
        control_stop.clone(),
    ));
    info!(%listen, "control plane listening (/health, /ready, /metrics)");

    let mut running = Vec::with_capacity(pipelines.len());
    let started = start_all(&pipelines, &readiness, &mut running).await;
    if let Err(e) = started {
        drain(running, &readiness);
        control_stop.cancel();
        let _ = control_task.await;
        return Err(e);
    }
    info!(
        pipelines = running.len(),
        "running; SIGINT/SIGTERM drains and exits"
    );

    shutdown.cancelled().await;
    drain(running, &readiness);
    control_stop.cancel();
    match control_task.await {
        Ok(result) => result?,
        Err(join) => warn!("control plane task ended abnormally: {join}"),
    }
    info!("stopped");
    Ok(())
}

async fn start_all(
    pipelines: &[PipelineConfig],
    readiness: &Readiness,
    running: &mut Vec<RunningPipeline>,
) -> Result<(), RuntimeError> {
    for p in pipelines {
        readiness.register(&p.name, "log");
    }
    for p in pipelines {
        let log = AnyLog::open(log_config(p)).map_err(|source| RuntimeError::Log {
            pipeline: p.name.clone(),
            source,
        })?;
        readiness.set(&p.name, "log", true);
        info!(pipeline = %p.name, log = %describe_log(&p.log), "log open");
        running.push(RunningPipeline {
            name: p.name.clone(),
            log,
        });
    }
    Ok(())
}

/// Stops pipelines in the order they were started; within a pipeline, stages in data-path order.
fn drain(running: Vec<RunningPipeline>, readiness: &Readiness) {
    for p in running {
        info!(pipeline = %p.name, "draining");
        readiness.set(&p.name, "log", false);
        // Dropping the log flushes and closes it (sled flushes on drop; Kafka flushes the producer).
        drop(p.log);
    }
}

fn log_config(p: &PipelineConfig) -> log::LogConfig {
    match &p.log {
        config::LogConfig::Embedded { path } => {
            log::LogConfig::Embedded(EmbeddedLogConfig::new(path.clone()))
        }
        config::LogConfig::Kafka {
            brokers,
            topic_prefix,
            schema_registry: _,
        } => {
            let mut kafka = KafkaLogConfig::new(brokers.join(","));
            kafka.topic_prefix = topic_prefix.clone();
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
