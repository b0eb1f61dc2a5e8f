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
    /// Check pipeline files without connecting anywhere; lists every problem as file:line:col.
    Validate {
        #[arg(required = true, value_name = "PIPELINE.yaml")]
        files: Vec<PathBuf>,
    },
    /// Run the offline Microsoft Graph emulator (SharePoint lists) for tests and demos.
    GraphEmulator(emulator::EmulatorArgs),
    /// Print the JSON Schema of pipeline files.
    ConfigSchema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init_tracing() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    match cli.command {
        Command::Validate { files } => match config::load_files(&files) {
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
        Command::GraphEmulator(args) => block_on(|shutdown| async move {
            emulator::run(args, shutdown)
                .await
                .map_err(anyhow::Error::from)
        }),
    }
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
