//! The `syncbridge` binary: the CLI edge. Everything below it is the library; `anyhow` lives only here.
//!
//! Exit codes: 0 success; 1 invalid configuration (`validate`, or `run` refusing a bad file);
//! 2 command-line usage error; 3 runtime failure (a stage failed, a port was taken, ...).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use syncbridge::{config, emulator, reload, runtime, telemetry};
use tokio_util::sync::CancellationToken;

const EXIT_INVALID_CONFIG: u8 = 1;
const EXIT_USAGE: u8 = 2;
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
    /// Print a shell completion script.
    ///
    /// For bash, zsh, fish, elvish or powershell, to stdout, e.g.
    /// `syncbridge completions bash > /etc/bash_completion.d/syncbridge`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page.
    ///
    /// In roff, to stdout, e.g. `syncbridge man > syncbridge.1`.
    Man,
    /// Run pipelines until SIGINT/SIGTERM (SIGHUP reloads).
    ///
    /// Runs one or more pipelines until SIGINT/SIGTERM, then drains in pipeline order and exits 0.
    /// SIGHUP re-reads the files and restarts the pipelines that changed (a bad file or a change
    /// that cannot apply live changes nothing and says why).
    Run {
        #[arg(required = true, value_name = "PIPELINE.yaml")]
        files: Vec<PathBuf>,
        /// Also reload when a file's content changes (checked every second).
        #[arg(long)]
        watch: bool,
        /// Let the API (mapping editor) write the pipeline files: `PUT /pipelines/{name}/config`
        /// replaces a writable file atomically and reloads its pipeline.
        #[arg(long)]
        allow_config_writes: bool,
    },
    /// Check pipeline files (--db, --graph: also the database and the lists).
    ///
    /// Without options nothing is connected to; with --db also the tables in the source
    /// database; with --graph also the live lists. Lists every problem as file:line:col.
    Validate {
        #[arg(required = true, value_name = "PIPELINE.yaml")]
        files: Vec<PathBuf>,
        /// Also check each synced table in the source database (exists, has a key; warns about
        /// TOAST-able columns of tables that are not REPLICA IDENTITY FULL). Warnings keep exit 0.
        #[arg(long)]
        db: bool,
        /// Also check the live lists in Graph against the mapping (list and column exist, type,
        /// choices, SyncKey indexed and unique); every mismatch is one line, exit 1 when any.
        #[arg(long)]
        graph: bool,
        /// With --graph: print each mismatch as one JSON object per line on stdout.
        #[arg(long, requires = "graph")]
        json: bool,
    },
    /// Re-snapshot one table while streaming continues.
    ///
    /// Asks the running process (at the pipeline's control.listen).
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
    /// Compare a running pipeline's tables with its lists; --heal fixes.
    ///
    /// Reports missing, orphaned, divergent, misrouted and duplicate items and stale ledger
    /// entries; a dry run unless `--heal`. Asks the running process (at control.listen).
    Drift {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
        /// Fix what the check finds, through the writer path.
        #[arg(long)]
        heal: bool,
        /// Print the whole report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The accidental-delete guard: the deletes it holds, and the operator's decision.
    ///
    /// More deletes within a window than `guard.push`/`guard.pull` allow pause that direction's deletes
    /// (ops/docs/guard.md). `status` (default) shows them; `allow` applies them; `discard` drops
    /// them (push: the items stay; pull: the items are re-created from the rows). Exit 2: not
    /// paused; 3: no process.
    Guard {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
        #[arg(value_enum, default_value = "status")]
        action: GuardAction,
        /// push: deletes bound for the lists; pull: items deleted in a list, bound for the tables.
        #[arg(long, value_parser = ["push", "pull"], default_value = "push")]
        direction: String,
    },
    /// Dead letters: rows the push path could not write, and replaying them.
    ///
    /// Each with the reason. With the embedded log, stop `syncbridge run` first (the log directory is locked).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Conflicts (both sides changed a field), and resolving parked ones.
    ///
    /// `syncbridge conflicts [--parked] [--json] <PIPELINE.yaml>` is `list`.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Conflicts {
        #[command(subcommand)]
        action: Option<ConflictsAction>,
        #[arg(value_name = "PIPELINE.yaml", required = true)]
        file: Option<PathBuf>,
        /// Only parked conflicts still waiting for an operator.
        #[arg(long)]
        parked: bool,
        #[arg(long)]
        json: bool,
    },
    /// Resume a pipeline that paused itself, once the cause is fixed.
    ///
    /// A pipeline pauses on a run of dead letters of one kind, or on a change event whose schema
    /// cannot be had (`/ready` and `GET /pipelines/{name}/pause` say why). Resumed, its processor
    /// restarts from the last acknowledged event. Exit 2: not paused; 3: no process listening.
    Resume {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
    },
    /// Describe the pipelines' source databases from their catalogs.
    ///
    /// Tables, columns
    /// (types, nullability, defaults), keys, foreign keys, indexes, replica identity and
    /// publication membership. Connects to the source itself (no running process needed).
    /// `--json`: one document per database per line, as `GET /catalog/{database}/tables`.
    Catalog {
        #[arg(required = true, value_name = "PIPELINE.yaml")]
        files: Vec<PathBuf>,
        /// Only this database (a source database name); default: every one.
        #[arg(long)]
        database: Option<String>,
        /// Only the tables of this schema.
        #[arg(long)]
        schema: Option<String>,
        /// Only this table, `schema.table` (as `GET /catalog/{database}/tables/{table}`).
        #[arg(long, value_name = "SCHEMA.TABLE", conflicts_with = "schema")]
        table: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// What the pipeline files sync, by application, database and table.
    ///
    /// Applications (labels.application) → databases → instances → tables with their lists. `--json`: as `GET /inventory`.
    Inventory {
        #[arg(required = true, value_name = "PIPELINE.yaml")]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Where the running pipeline's cursors stand, and moving one.
    ///
    /// Its replication slot, every consumer group per
    /// partition (committed, end, lag) and every list's delta link; `cursors reset` moves one
    /// (try `--dry-run` first: it prints the blast radius and changes nothing).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Cursors {
        #[command(subcommand)]
        action: Option<CursorsAction>,
        #[arg(value_name = "PIPELINE.yaml", required = true)]
        file: Option<PathBuf>,
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

#[derive(Debug, Subcommand)]
enum ConflictsAction {
    /// Recorded conflicts, oldest first, with their state: decided (by policy), open (parked),
    /// resolved (by whom, when, which side), superseded (the row conflicted again since). Asks
    /// the running process; when none listens, reads the log (stopped process, or Kafka).
    List {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
        /// Only parked conflicts still waiting for an operator.
        #[arg(long)]
        parked: bool,
        #[arg(long)]
        json: bool,
    },
    /// Decide a parked conflict: the running process writes the row's current values to the
    /// item (`--take source`) or the item's to the row (`--take target`). Exit 2: the id names
    /// no open parked conflict; 3: the process is not running, a side changed since, or a write
    /// failed (the conflict stays open).
    Resolve {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
        /// The conflict id (first column of `syncbridge conflicts list`).
        id: String,
        #[arg(long, value_enum)]
        take: TakeArg,
        /// Who decided (recorded with the resolution); default `$USER`.
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CursorsAction {
    /// Move one cursor of the running pipeline: a consumer group (--group with one of --to,
    /// --offset, --shift-by, --time), the slot (--slot now|LSN, forward only) or a list's delta
    /// link (--list: enumerate the list again). The processor's groups are moved by stopping it,
    /// moving the offsets and restarting it. Exit 2: a bad target; 3: refused (the stage holding
    /// the cursor runs), or no process listening.
    Reset {
        #[arg(value_name = "PIPELINE.yaml")]
        file: PathBuf,
        /// A consumer group: sync, return, dlq-replay, or its full name.
        #[arg(long, conflicts_with_all = ["slot", "list"], required_unless_present_any = ["slot", "list"])]
        group: Option<String>,
        /// The group to its earliest or latest offsets.
        #[arg(long, value_parser = ["earliest", "latest"], requires = "group")]
        to: Option<String>,
        /// The group to this offset (in every selected partition).
        #[arg(long, requires = "group")]
        offset: Option<i64>,
        /// The group's positions moved by N (negative: back, events are read again).
        #[arg(long, requires = "group", allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// The group to the first offset at or after this RFC 3339 time.
        #[arg(long, requires = "group")]
        time: Option<String>,
        /// Only this topic of the group.
        #[arg(long, requires = "group")]
        topic: Option<String>,
        /// Only this partition.
        #[arg(long, requires = "group")]
        partition: Option<i32>,
        /// The replication slot to `now` or an LSN (forward only).
        #[arg(long, conflicts_with = "list")]
        slot: Option<String>,
        /// A list (display name or id) whose delta link goes to none.
        #[arg(long)]
        list: Option<String>,
        /// Print the blast radius only; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Who asks (recorded with the run); default `$USER`.
        #[arg(long)]
        by: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `syncbridge guard` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GuardAction {
    Status,
    Allow,
    Discard,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TakeArg {
    /// PostgreSQL's values win.
    Source,
    /// SharePoint's values win.
    Target,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init_tracing() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    match cli.command {
        Command::Validate {
            files,
            db,
            graph: true,
            json,
        } => {
            let code = if db {
                validate_db(&files)
            } else {
                ExitCode::SUCCESS
            };
            if code == ExitCode::SUCCESS {
                validate_graph(&files, json)
            } else {
                code
            }
        }
        Command::Validate {
            files, db: true, ..
        } => validate_db(&files),
        Command::Snapshot { file, table, wait } => snapshot(&file, &table, wait),
        Command::Resume { file } => resume(&file),
        Command::Validate { files, .. } => match config::load_files(&files) {
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
        Command::Run {
            files,
            watch,
            allow_config_writes,
        } => {
            let pipelines = match config::load_files(&files) {
                Ok(p) => p,
                Err(report) => {
                    print_report(&report);
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            // The process serves the first file's control plane (see runtime::run).
            if let Some(first) = pipelines.first() {
                let control = syncbridge::control::ControlConfig {
                    listen: first.control.listen,
                    tokens: first.control.tokens.clone(),
                };
                if let Err(e) = syncbridge::control::check_exposure(&control) {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            }
            block_on(|shutdown| async move {
                // One pending request is enough: a reload reads the files as they are then.
                let (tx, requests) = tokio::sync::mpsc::channel(1);
                tokio::spawn(reload::on_sighup(tx.clone(), shutdown.clone()));
                if watch {
                    tokio::spawn(reload::watch_files(
                        files.clone(),
                        reload::WATCH_INTERVAL,
                        tx,
                        shutdown.clone(),
                    ));
                }
                let source = runtime::ReloadSource {
                    files,
                    requests,
                    allow_config_writes,
                };
                runtime::run_reloading(pipelines, Some(source), shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Command::Dlq { action } => dlq(action),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Into a buffer: clap_complete panics on a write error (e.g. a closed pipe).
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "syncbridge", &mut out);
            print_bytes(&out)
        }
        Command::Man => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => print_bytes(&out),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Drift { file, heal, json } => drift(&file, heal, json),
        Command::Guard {
            file,
            action,
            direction,
        } => guard(&file, action, direction),
        Command::Catalog {
            files,
            database,
            schema,
            table,
            json,
        } => catalog(&files, database, schema, table, json),
        Command::Inventory { files, json } => match config::load_files(&files) {
            Ok(pipelines) => {
                use syncbridge::control::catalog;
                let inv = catalog::project(&pipelines);
                if json {
                    println!("{}", serde_json::to_string(&inv).unwrap_or_default());
                } else {
                    print!("{}", catalog::text::inventory(&inv));
                }
                ExitCode::SUCCESS
            }
            Err(report) => {
                print_report(&report);
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
        },
        Command::Conflicts {
            action: Some(ConflictsAction::List { file, parked, json }),
            ..
        }
        | Command::Conflicts {
            action: None,
            file: Some(file),
            parked,
            json,
        } => conflicts(&file, parked, json),
        Command::Conflicts {
            action: Some(ConflictsAction::Resolve { file, id, take, by }),
            ..
        } => resolve(&file, &id, take, by),
        Command::Conflicts { .. } => {
            eprintln!("error: `syncbridge conflicts` needs a pipeline file (see --help)");
            ExitCode::from(EXIT_USAGE)
        }
        Command::Cursors {
            action: Some(action),
            ..
        } => cursors_reset(action),
        Command::Cursors {
            action: None,
            file: Some(file),
            json,
        } => cursors(&file, json),
        Command::Cursors { .. } => {
            eprintln!("error: `syncbridge cursors` needs a pipeline file (see --help)");
            ExitCode::from(EXIT_USAGE)
        }
        Command::GraphEmulator(args) => block_on(|shutdown| async move {
            emulator::run(args, shutdown)
                .await
                .map_err(anyhow::Error::from)
        }),
    }
}

/// `dlq list|replay`: asks the running process (which holds an embedded log); when none runs
/// the pipeline, reads and writes the pipeline's DLQ topic through its log.
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
        use syncbridge::control::client;
        let addr = pipeline.control.listen;
        match action {
            DlqAction::List { json, .. } => {
                let (entries, pending) =
                    match client::dlq_list(addr, &pipeline.name, DLQ_LIST_MAX).await {
                        Ok(page) => {
                            let entries = page
                                .entries
                                .into_iter()
                                .map(|e| (e.offset, e.dead_letter))
                                .collect::<Vec<_>>();
                            (entries, page.pending)
                        }
                        Err(e) if e.not_running() => {
                            let entries = dlq_offline(&pipeline, false).await?.0;
                            let n = entries.len();
                            (entries, n)
                        }
                        Err(e) => return Err(e.into()),
                    };
                for (offset, d) in &entries {
                    if json {
                        println!("{}", serde_json::to_string(d)?);
                    } else {
                        println!("{}", syncbridge::process::dlq::describe(d, *offset));
                    }
                }
                eprintln!("{pending} dead letter(s) not yet replayed");
            }
            DlqAction::Replay { .. } => match client::dlq_replay(addr, &pipeline.name).await {
                Ok(v) => println!(
                    "replayed {} dead letter(s) through the running process (run {}); its \
                     processor handles them next",
                    v["replayed"], v["run_id"]
                ),
                Err(e) if e.not_running() => {
                    let n = dlq_offline(&pipeline, true).await?.1;
                    println!("replayed {n} dead letter(s); `syncbridge run` processes them next");
                }
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    })
}

/// `syncbridge drift`: asks the running process for a check (or heal) and prints its report;
/// exits 1 when differences were found by a check (0 after a heal).
fn drift(file: &std::path::Path, heal: bool, json: bool) -> ExitCode {
    let pipeline = match config::load_files(&[file.to_path_buf()]) {
        Ok(mut p) => p.remove(0),
        Err(report) => {
            print_report(&report);
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let mut found = 0;
    let code = block_on(|_| {
        let found = &mut found;
        async move {
            let addr = pipeline.control.listen;
            let r = syncbridge::control::client::drift(addr, &pipeline.name, heal).await?;
            let counts = &r["counts"];
            *found = [
                "missing",
                "orphaned",
                "divergent",
                "misrouted",
                "duplicate",
                "stale_ledger",
            ]
            .iter()
            .map(|c| counts[c].as_u64().unwrap_or(0))
            .sum::<u64>();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            println!("drift run {}: {found} difference(s) {counts}", r["run_id"]);
            for l in r["lists"].as_array().into_iter().flatten() {
                println!(
                    "  list {}: {} row(s), {} item(s)",
                    l["list"], l["rows"], l["items"]
                );
            }
            for d in r["differences"].as_array().into_iter().flatten() {
                println!("  {d}");
            }
            println!(
                "graph: {} request(s), {} RU",
                r["graph_requests"], r["resource_units"]
            );
            if let Some(h) = r.get("healed") {
                println!("healed: {h}");
            }
            Ok(())
        }
    });
    if code == ExitCode::SUCCESS && !heal && found > 0 {
        return ExitCode::from(1);
    }
    code
}

/// Most dead letters `dlq list` prints through the API (the server's page limit).
const DLQ_LIST_MAX: usize = 1000;

/// The DLQ through the pipeline's own log (no process runs it): the pending entries, or with
/// `replay` the number replayed, recorded as a `dlq_replay` run whose events wait in the runs
/// topic until the next `syncbridge run` projects them.
async fn dlq_offline(
    pipeline: &config::PipelineConfig,
    replay: bool,
) -> anyhow::Result<(Vec<(i64, syncbridge::process::dlq::DeadLetter)>, usize)> {
    use syncbridge::control::meta::{self, RunCounts, RunKind, RunRecorder, RunStatus};
    use syncbridge::process::dlq;
    let log = runtime::open_log(pipeline).map_err(|e| {
        anyhow::anyhow!(
            "{e} (the embedded log is locked by a `syncbridge run` whose control plane does not \
             answer at {})",
            pipeline.control.listen
        )
    })?;
    let prefix = runtime::topic_prefix(pipeline);
    if !replay {
        return Ok((dlq::pending(&log, prefix, &pipeline.name).await?, 0));
    }
    let log = std::sync::Arc::new(log);
    let topic = meta::runs_topic(prefix, &pipeline.name);
    meta::runs::ensure_runs_topic(&*log, &topic).await?;
    let mut run =
        RunRecorder::start(log.clone(), topic, &pipeline.name, RunKind::DlqReplay).await?;
    match dlq::replay(&*log, prefix, &pipeline.name).await {
        Ok(n) => {
            let counts = RunCounts {
                replayed: n as u64,
                ..RunCounts::default()
            };
            run.finish(RunStatus::Succeeded, counts, None).await?;
            Ok((Vec::new(), n))
        }
        Err(e) => {
            let reason = Some(e.to_string());
            run.finish(RunStatus::Failed, RunCounts::default(), reason)
                .await?;
            Err(e.into())
        }
    }
}

/// `conflicts [list]`: asks the running process; when none listens, reads the conflicts topic
/// through the pipeline's log.
fn conflicts(file: &std::path::Path, parked: bool, json: bool) -> ExitCode {
    let pipeline = match config::load_files(&[file.to_path_buf()]) {
        Ok(mut p) => p.remove(0),
        Err(report) => {
            print_report(&report);
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    block_on(|_| async move {
        use syncbridge::control::client;
        use syncbridge::pull::{self, ConflictState};
        let addr = pipeline.control.listen;
        let views = match client::list_conflicts(addr, &pipeline.name, parked).await {
            Ok(v) => v,
            // No process runs this pipeline there: the log is free to read.
            Err(e) if e.not_running() => {
                let log = runtime::open_log(&pipeline).map_err(|e| {
                    anyhow::anyhow!(
                        "{e} (the embedded log is locked by a `syncbridge run` whose control \
                         plane does not answer at {addr})"
                    )
                })?;
                let topic = pull::conflicts_topic(runtime::topic_prefix(&pipeline), &pipeline.name);
                let entries = pull::read_conflicts(&log, &topic).await?;
                pull::conflict_views(entries)
                    .into_iter()
                    .filter(|v| !parked || v.state == ConflictState::Open)
                    .collect()
            }
            Err(e) => return Err(e.into()),
        };
        for v in &views {
            if json {
                println!("{}", serde_json::to_string(v)?);
            } else {
                println!("{}", describe_conflict(v));
            }
        }
        eprintln!(
            "{} conflict(s){}",
            views.len(),
            if parked {
                " waiting for an operator"
            } else {
                ""
            }
        );
        Ok(())
    })
}

/// One line per conflict: id, table, key, state, fields.
fn describe_conflict(v: &syncbridge::pull::ConflictView) -> String {
    use syncbridge::pull::ConflictState;
    let rec = &v.record;
    let state = match v.state {
        ConflictState::Decided => rec.decision.clone(),
        ConflictState::Open => "parked, open".into(),
        ConflictState::Superseded => format!(
            "parked, superseded by {}",
            v.superseded_by.as_deref().unwrap_or("?")
        ),
        ConflictState::Resolved => match &v.resolution {
            Some(r) => format!(
                "parked, resolved: took {} by {} at {}",
                r.take,
                r.resolved_by.as_deref().unwrap_or("?"),
                syncbridge::pull::format_ms(r.at_ms)
            ),
            None => "parked, resolved".into(),
        },
    };
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
    format!(
        "{} {} key={} [{}] {}",
        rec.id,
        rec.table,
        rec.key,
        state,
        fields.join("; ")
    )
}

/// `conflicts resolve FILE ID --take source|target`: asks the running process.
fn resolve(file: &std::path::Path, id: &str, take: TakeArg, by: Option<String>) -> ExitCode {
    use syncbridge::control::client::{self, ClientError};
    use syncbridge::pull::Take;
    let p = match load_one(file) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let take = match take {
        TakeArg::Source => Take::Source,
        TakeArg::Target => Take::Target,
    };
    let by = by.or_else(|| std::env::var("USER").ok());
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let addr = p.control.listen;
    // A busy processor (the row or item has a change in progress) is asked again for a while.
    let result = rt.block_on(async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match client::resolve_conflict(addr, &p.name, id, take, by.as_deref()).await {
                Err(ClientError::Refused {
                    kind: Some(k),
                    message,
                    ..
                }) if k == "busy" && std::time::Instant::now() < deadline => {
                    tracing::info!("{message}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                other => break other,
            }
        }
    });
    match result {
        Ok(v) => {
            println!("{}", describe_conflict(&v));
            println!(
                "conflict {id} resolved: took {take} ({} field(s) decided)",
                v.resolution.as_ref().map_or(0, |r| r.fields.len())
            );
            ExitCode::SUCCESS
        }
        Err(ClientError::NotListening { .. }) => {
            eprintln!(
                "error: no SyncBridge process is listening on {addr} (control.listen of pipeline \
                 {}): start it with `syncbridge run {}` and resolve again; the running process \
                 applies the decision (it owns the ledger)",
                p.name,
                file.display()
            );
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(ClientError::Refused { message, kind, .. }) => {
            eprintln!("error: {message}");
            match kind.as_deref() {
                Some("unknown" | "not_parked" | "already_resolved" | "superseded" | "gone") => {
                    ExitCode::from(EXIT_USAGE)
                }
                _ => ExitCode::from(EXIT_RUNTIME),
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `catalog FILES [--database D] [--schema S | --table S.T] [--json]`: reads each source
/// database's catalog itself. Exit 2: a `--database` or `--table` that names nothing.
fn catalog(
    files: &[PathBuf],
    database: Option<String>,
    schema: Option<String>,
    table: Option<String>,
    json: bool,
) -> ExitCode {
    use syncbridge::control::catalog::{self, Filter, inventory};
    let pipelines = match config::load_files(files) {
        Ok(p) => p,
        Err(report) => {
            print_report(&report);
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let names = inventory::database_names(&pipelines);
    let names: Vec<String> = match database {
        Some(d) if names.contains(&d) => vec![d],
        Some(d) => {
            eprintln!(
                "error: no pipeline reads a database named {d:?} (these do: {})",
                names.join(", ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
        None => names,
    };
    let filter = match table.as_deref().map(catalog::parse_table_name) {
        Some(Ok((schema, name))) => Filter {
            schema: Some(schema),
            table: Some(name),
        },
        Some(Err(e)) => {
            eprintln!("error: --table {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        None => {
            if let Some(Err(e)) = schema.as_deref().map(catalog::check_name) {
                eprintln!("error: --schema {e}");
                return ExitCode::from(EXIT_USAGE);
            }
            Filter {
                schema,
                table: None,
            }
        }
    };
    let mut found = false;
    let code = block_on(|_| async {
        for name in &names {
            let c = catalog::database_catalog(&pipelines, name, &filter).await?;
            found |= !c.tables.is_empty();
            match (&filter.table, c.tables.first()) {
                (Some(_), None) => {}
                (Some(_), Some(t)) if json => println!("{}", serde_json::to_string(t)?),
                (Some(_), Some(t)) => print!("{}", catalog::text::table(t)),
                (None, _) if json => println!("{}", serde_json::to_string(&c)?),
                (None, _) => print!("{}", catalog::text::database(&c)),
            }
        }
        Ok(())
    });
    if code == ExitCode::SUCCESS && !found && filter.table.is_some() {
        eprintln!(
            "error: no table {} in {}",
            table.unwrap_or_default(),
            names.join(", ")
        );
        return ExitCode::from(EXIT_USAGE);
    }
    code
}

/// `validate --db`: the offline checks, then the database checks of each pipeline.
fn validate_db(files: &[PathBuf]) -> ExitCode {
    let pipelines = match load_checked(files) {
        Ok(p) => p,
        Err(code) => return code,
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
    check_outcome(code, errors, "problem(s)")
}

/// The offline checks of `validate --db`/`--graph`: the pipelines, or the exit code after the
/// problems were printed.
fn load_checked(files: &[PathBuf]) -> Result<Vec<config::LocatedPipeline>, ExitCode> {
    config::load_files_located(files).map_err(|report| {
        print_report(&report);
        eprintln!("{} problem(s) found", report.problems.len());
        ExitCode::from(EXIT_INVALID_CONFIG)
    })
}

/// The exit code of a check that ran with `code` and found `found` errors (`what`).
fn check_outcome(code: ExitCode, found: usize, what: &str) -> ExitCode {
    if code != ExitCode::SUCCESS {
        return code;
    }
    if found > 0 {
        eprintln!("{found} {what} found");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    ExitCode::SUCCESS
}

/// `validate --graph`: the offline checks, then each pipeline's live lists against its mapping
/// (nothing is changed). Exit 1 when a list does not match or `graph.team` names no single Team,
/// 3 when Graph cannot be reached.
fn validate_graph(files: &[PathBuf], json: bool) -> ExitCode {
    use syncbridge::graph::{GraphClient, GraphClientConfig, LimiterRegistry};
    let pipelines: Vec<config::PipelineConfig> = match load_checked(files) {
        Ok(p) => p.into_iter().map(|l| l.config).collect(),
        Err(code) => return code,
    };
    let mut total = 0usize;
    let code = block_on(|_| async {
        let limiters = LimiterRegistry::new();
        for p in &pipelines {
            let client = GraphClient::new(GraphClientConfig::from(&p.graph), &limiters)?;
            let found = match syncbridge::process::provision::check(&client, p).await {
                // A Team that matches none or several is the file's problem, not Graph's.
                Err(syncbridge::graph::GraphError::Target(why)) => {
                    eprintln!("{}: graph.team: {why}", p.name);
                    total += 1;
                    continue;
                }
                r => r?,
            };
            for m in &found {
                if json {
                    let mut v = serde_json::to_value(m)?;
                    v["pipeline"] = p.name.clone().into();
                    println!("{v}");
                } else {
                    eprintln!("{}: {m}", p.name);
                }
            }
            total += found.len();
            if !json {
                let lists = syncbridge::process::provision::needed(p).len();
                let state = if found.is_empty() { "ok" } else { "mismatches" };
                println!("{state}: {} ({lists} list(s) checked in Graph)", p.name);
            }
        }
        Ok(())
    });
    check_outcome(code, total, "mismatch(es)")
}

/// `snapshot FILE --table S.T`: asks the running process over its control plane.
fn snapshot(file: &std::path::Path, table: &str, wait: bool) -> ExitCode {
    let p = match load_one(file) {
        Ok(p) => p,
        Err(code) => return code,
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
            // A spinner with the rows so far (drawn only on a terminal, below log lines).
            let bar = syncbridge::telemetry::progress().add(indicatif::ProgressBar::new_spinner());
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            let done = client::wait_for_snapshot(addr, &p.name, &id, |s| {
                bar.set_message(format!(
                    "{table}: {} rows, {} chunks ({})",
                    s["rows"].as_u64().unwrap_or(0),
                    s["chunks"].as_u64().unwrap_or(0),
                    s["state"].as_str().unwrap_or("?")
                ));
            })
            .await;
            bar.finish_and_clear();
            println!("{}", done?);
        } else {
            println!(
                "follow it with: curl http://{addr}/pipelines/{}/snapshot",
                p.name
            );
        }
        Ok(())
    })
}

fn resume(file: &std::path::Path) -> ExitCode {
    use syncbridge::control::client;
    // 409: not paused.
    api_call(
        file,
        409,
        |addr, name| async move { client::resume(addr, &name).await },
        |name, body| {
            let pause = &body["pause"];
            println!(
                "pipeline {name} resumed (it was paused: {} {})",
                pause["kind"].as_str().unwrap_or("?"),
                pause["reason"].as_str().unwrap_or("")
            );
        },
    )
}

fn guard(file: &std::path::Path, action: GuardAction, direction: String) -> ExitCode {
    use syncbridge::control::client;
    let decision = match action {
        GuardAction::Status => None,
        GuardAction::Allow => Some("allow"),
        GuardAction::Discard => Some("discard"),
    };
    // 409: nothing to decide (the direction is not paused).
    let shown = direction.clone();
    api_call(
        file,
        409,
        |addr, name| async move {
            match decision {
                None => client::guard_status(addr, &name).await,
                Some(d) => client::guard_decide(addr, &name, &direction, d).await,
            }
        },
        |name, body| match decision {
            None => {
                let d = &body[shown.as_str()];
                let state = if d["paused"].as_bool() == Some(true) {
                    "PAUSED"
                } else {
                    "flowing"
                };
                println!(
                    "pipeline {name}, {shown}: {state}, {} deletes held (threshold {}, {} applied in the window)",
                    d["held"], d["threshold"], d["recent"],
                );
                for k in d["first_keys"].as_array().into_iter().flatten() {
                    println!("  {}", k.as_str().unwrap_or("?"));
                }
            }
            Some(d) => println!(
                "pipeline {name}, {}: {d} applied to {} held deletes",
                body["direction"].as_str().unwrap_or("?"),
                body["deletes"]
            ),
        },
    )
}

/// Runs one control-plane call for the pipeline of `file`; `show` prints its answer (given the
/// pipeline's name). The HTTP status `usage` (the request did not fit: a bad target, a pipeline
/// not paused) exits 2, any other failure 3.
fn api_call<F, Fut>(
    file: &std::path::Path,
    usage: u16,
    call: F,
    show: impl FnOnce(&str, &serde_json::Value),
) -> ExitCode
where
    F: FnOnce(std::net::SocketAddr, String) -> Fut,
    Fut: std::future::Future<
            Output = Result<serde_json::Value, syncbridge::control::client::ClientError>,
        >,
{
    let p = match load_one(file) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    use syncbridge::control::client::ClientError;
    match rt.block_on(call(p.control.listen, p.name.clone())) {
        Ok(body) => {
            show(&p.name, &body);
            ExitCode::SUCCESS
        }
        Err(ClientError::Refused {
            status, message, ..
        }) if status == usage => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `cursors <file> [--json]`.
fn cursors(file: &std::path::Path, json: bool) -> ExitCode {
    use syncbridge::control::client;
    api_call(
        file,
        400,
        |addr, name| async move { client::cursors(addr, &name).await },
        |_, body| {
            if json {
                println!("{body:#}");
            } else {
                print!("{}", syncbridge::control::cursors::text::describe(body));
            }
        },
    )
}

/// `cursors reset <file> …`.
fn cursors_reset(action: CursorsAction) -> ExitCode {
    use syncbridge::control::client;
    let CursorsAction::Reset {
        file,
        group,
        to,
        offset,
        shift_by,
        time,
        topic,
        partition,
        slot,
        list,
        dry_run,
        by,
        json,
    } = action;
    let mut body = serde_json::json!({
        "group": group, "to": to, "offset": offset, "shift_by": shift_by, "time": time,
        "topic": topic, "partition": partition, "slot": slot, "list": list,
        "dry_run": dry_run, "by": by.or_else(|| std::env::var("USER").ok()),
    });
    if list.is_some() {
        body["to"] = serde_json::json!("none");
    }
    if let Some(o) = body.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    api_call(
        &file,
        400,
        |addr, name| async move { client::reset_cursor(addr, &name, &body).await },
        |_, answer| {
            if json {
                println!("{answer:#}");
            } else {
                print!(
                    "{}",
                    syncbridge::control::cursors::text::describe_reset(answer)
                );
            }
        },
    )
}

/// The one pipeline of `file`; its problems are printed and the exit code returned.
fn load_one(file: &std::path::Path) -> Result<config::PipelineConfig, ExitCode> {
    match config::load_files(&[file.to_path_buf()]) {
        Ok(mut p) if p.len() == 1 => Ok(p.remove(0)),
        Ok(_) => Err(ExitCode::from(EXIT_INVALID_CONFIG)),
        Err(report) => {
            print_report(&report);
            Err(ExitCode::from(EXIT_INVALID_CONFIG))
        }
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

/// Writes generated text to stdout; a reader that went away (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
