//! The `syncbridge` binary: the CLI edge. Everything below it is the library; `anyhow` lives only here.
//!
//! Exit codes: 0 success; 1 invalid configuration (`validate`, or `run` refusing a bad file);
//! 2 command-line usage error; 3 runtime failure (a stage failed, a port was taken, ...).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use syncbridge::{config, emulator, runtime, telemetry};
use tokio_util::sync::CancellationToken;

const EXIT_INVALID_CONFIG: u8 = 1;
const EXIT_RUNTIME: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "syncbridge",
    version,
    about = "Keeps PostgreSQL tables and SharePoint lists in sync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once at start-up: the size of the emulator's arguments does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run one or more pipelines until SIGINT/SIGTERM, then drain in pipeline order and exit 0.
    Run {
        #[arg(required = true, value_name = "PIPELINE.yaml")]
        files: Vec<PathBuf>,
    },
    /// Check pipeline files without connecting anywhere (with --db: also the tables in the
    /// source database); lists every problem as file:line:col.
    Validate {
        #[arg(required = true, value_name = "PIPELINE.yaml")]
        files: Vec<PathBuf>,
        /// Also check each synced table in the source database (exists, has a key; warns about
        /// TOAST-able columns of tables that are not REPLICA IDENTITY FULL). Warnings keep exit 0.
        #[arg(long)]
        db: bool,
    },
    /// Ask the running process (at the pipeline's control.listen) to re-snapshot one table while
    /// streaming continues.
    Snapshot {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
        /// The table, schema-qualified (schema.table); must be synced by the pipeline.
        #[arg(long, value_name = "SCHEMA.TABLE")]
        table: String,
        /// Wait until it is done (exit 0) or failed (exit 3), printing the final status.
        #[arg(long)]
        wait: bool,
    },
    /// Dead letters of a pipeline: rows the push path could not write, with the reason.
    /// With the embedded log, stop `syncbridge run` first (the log directory is locked).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Conflicts the return path recorded (both sides changed a field), newest last.
    /// With the embedded log, stop `syncbridge run` first (the log directory is locked).
    Conflicts {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
        /// Only parked (`manual`) conflicts.
        #[arg(long)]
        parked: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run the offline Microsoft Graph emulator (SharePoint lists) for tests and demos.
    GraphEmulator(emulator::EmulatorArgs),
    /// Print the JSON Schema of pipeline files.
    ConfigSchema,
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Print the dead letters not yet replayed, one per line (or JSON lines with --json).
    List {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Re-send each dead letter's original change event through the pipeline (after fixing the
    /// mapping, the list or the data); rows changed since are not rolled back (newer wins).
    Replay {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init_tracing() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    match cli.command {
        Command::Validate { files, db: true } => validate_db(&files),
        Command::Snapshot { file, table, wait } => snapshot(&file, &table, wait),
        Command::Validate { files, db: false } => match config::load_files(&files) {
            Ok(pipelines) => {
                for p in &pipelines {
                    println!(
                        "ok: {} ({} sync entr{})",
                        p.name,
                        p.sync.len(),
                        if p.sync.len() == 1 { "y" } else { "ies" }
                    );
                }
                ExitCode::SUCCESS
            }
            Err(report) => {
                print_report(&report);
                eprintln!("{} problem(s) found", report.problems.len());
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
        },
        Command::ConfigSchema => {
            println!("{:#}", config::json_schema());
            ExitCode::SUCCESS
        }
        Command::Run { files } => {
            let pipelines = match config::load_files(&files) {
                Ok(p) => p,
                Err(report) => {
                    print_report(&report);
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            block_on(|shutdown| async move {
                runtime::run(pipelines, shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Command::Dlq { action } => dlq(action),
        Command::Conflicts { file, parked, json } => conflicts(&file, parked, json),
        Command::GraphEmulator(args) => block_on(|shutdown| async move {
            emulator::run(args, shutdown)
                .await
                .map_err(anyhow::Error::from)
        }),
    }
}

/// `dlq list|replay`: reads the pipeline's DLQ topic through its log.
fn dlq(action: DlqAction) -> ExitCode {
    let file = match &action {
        DlqAction::List { file, .. } | DlqAction::Replay { file } => file.clone(),
    };
    let pipeline = match config::load_files(std::slice::from_ref(&file)) {
        Ok(mut p) => p.remove(0),
        Err(report) => {
            print_report(&report);
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    block_on(|_| async move {
        use syncbridge::process::dlq;
        let log = runtime::open_log(&pipeline).map_err(|e| {
            anyhow::anyhow!(
                "{e} (with the embedded log, stop `syncbridge run` for this pipeline first)"
            )
        })?;
        let prefix = runtime::topic_prefix(&pipeline);
        match action {
            DlqAction::List { json, .. } => {
                let entries = dlq::pending(&log, prefix, &pipeline.name).await?;
                for (offset, d) in &entries {
                    if json {
                        println!("{}", serde_json::to_string(d)?);
                    } else {
                        println!("{}", dlq::describe(d, *offset));
                    }
                }
                eprintln!("{} dead letter(s) not yet replayed", entries.len());
            }
            DlqAction::Replay { .. } => {
                let n = dlq::replay(&log, prefix, &pipeline.name).await?;
                println!("replayed {n} dead letter(s); `syncbridge run` processes them next");
            }
        }
        Ok(())
    })
}

/// `conflicts`: reads the pipeline's conflicts topic through its log.
fn conflicts(file: &std::path::Path, parked: bool, json: bool) -> ExitCode {
    let pipeline = match config::load_files(&[file.to_path_buf()]) {
        Ok(mut p) => p.remove(0),
        Err(report) => {
            print_report(&report);
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    block_on(|_| async move {
        use syncbridge::log::{EventLog, LogConsumer, TopicSpec};
        let log = runtime::open_log(&pipeline).map_err(|e| {
            anyhow::anyhow!(
                "{e} (with the embedded log, stop `syncbridge run` for this pipeline first)"
            )
        })?;
        let topic =
            syncbridge::process::conflicts_topic(runtime::topic_prefix(&pipeline), &pipeline.name);
        log.ensure_topic(&TopicSpec::new(topic.clone(), 1)).await?;
        let end = log.end_offsets(&topic).await?.first().copied().unwrap_or(0);
        let stop = syncbridge::log::CancellationToken::new();
        let group = format!("{topic}.cli.{}", uuid::Uuid::new_v4().simple());
        let mut c = log
            .consumer(&group, std::slice::from_ref(&topic), stop.clone())
            .await?;
        let mut shown = 0;
        let mut read = 0;
        while read < end {
            let Ok(r) = tokio::time::timeout(std::time::Duration::from_secs(10), c.recv()).await
            else {
                break;
            };
            let Some(r) = r? else { break };
            read = r.offset + 1;
            let Some(v) = r.record.value else { continue };
            let Ok(rec) = serde_json::from_slice::<syncbridge::process::ConflictRecord>(&v) else {
                continue;
            };
            if parked && rec.decision != "parked" {
                continue;
            }
            shown += 1;
            if json {
                println!("{}", serde_json::to_string(&rec)?);
            } else {
                let fields: Vec<String> = rec
                    .fields
                    .iter()
                    .map(|f| {
                        format!(
                            "{}: source={} target={} ({} → {})",
                            f.field, f.source, f.target, f.policy, f.winner
                        )
                    })
                    .collect();
                println!(
                    "{} {} key={} [{}] {}",
                    rec.id,
                    rec.table,
                    rec.key,
                    rec.decision,
                    fields.join("; ")
                );
            }
        }
        stop.cancel();
        eprintln!("{shown} conflict(s)");
        Ok(())
    })
}

/// `validate --db`: the offline checks, then the database checks of each pipeline.
fn validate_db(files: &[PathBuf]) -> ExitCode {
    let pipelines = match config::load_files_located(files) {
        Ok(p) => p,
        Err(report) => {
            print_report(&report);
            eprintln!("{} problem(s) found", report.problems.len());
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let mut errors = 0usize;
    let code = block_on(|_| async {
        for p in &pipelines {
            let findings = syncbridge::capture::db_check::check_pipeline(p).await?;
            let mut warnings = 0usize;
            for f in &findings {
                eprintln!("{f}");
                match f.severity {
                    syncbridge::capture::db_check::Severity::Error => errors += 1,
                    syncbridge::capture::db_check::Severity::Warning => warnings += 1,
                }
            }
            println!(
                "{}: {} ({} table(s) checked in the database, {warnings} warning(s))",
                if findings
                    .iter()
                    .any(|f| f.severity == syncbridge::capture::db_check::Severity::Error)
                {
                    "problems"
                } else {
                    "ok"
                },
                p.config.name,
                p.config.sync.len()
            );
        }
        Ok(())
    });
    if code != ExitCode::SUCCESS {
        return code;
    }
    if errors > 0 {
        eprintln!("{errors} problem(s) found");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    ExitCode::SUCCESS
}

/// `snapshot FILE --table S.T`: asks the running process over its control plane.
fn snapshot(file: &std::path::Path, table: &str, wait: bool) -> ExitCode {
    let p = match config::load_files(&[file.to_path_buf()]) {
        Ok(mut p) if p.len() == 1 => p.remove(0),
        Ok(_) => return ExitCode::from(EXIT_INVALID_CONFIG),
        Err(report) => {
            print_report(&report);
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    if !p.sync.iter().any(|s| s.table.to_string() == table) {
        eprintln!(
            "error: table {table} is not synced by pipeline {} ({})",
            p.name,
            file.display()
        );
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    let addr = p.control.listen;
    block_on(|_| async move {
        use syncbridge::control::client;
        let queued = client::request_snapshot(addr, &p.name, table).await?;
        let id = queued["id"].as_str().unwrap_or_default().to_string();
        println!("re-snapshot {id} of {table} queued (pipeline {})", p.name);
        if wait {
            let done = client::wait_for_snapshot(addr, &p.name, &id).await?;
            println!("{done}");
        } else {
            println!(
                "follow it with: curl http://{addr}/pipelines/{}/snapshot",
                p.name
            );
        }
        Ok(())
    })
}

/// One problem per line, `file:line:col: message`, on stderr.
fn print_report(report: &config::ConfigReport) {
    let text = report.to_string();
    eprint!("{text}");
    if !text.ends_with('\n') {
        eprintln!();
    }
}

/// Runs `f` on a multi-threaded runtime with one cancellation token, cancelled on SIGINT/SIGTERM.
fn block_on<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        match f(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_RUNTIME)
            }
        }
    })
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received: draining"),
        _ = term.recv() => tracing::info!("SIGTERM received: draining"),
    }
    shutdown.cancel();
}
