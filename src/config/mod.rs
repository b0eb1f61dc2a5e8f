//! Pipeline configuration: YAML file → parse → validate (no IO) → typed [`PipelineConfig`].
//!
//! - **Parse** ([`yaml`]): `serde-saphyr`'s YAML parser builds a tree of nodes with line/column;
//!   `${VAR}` / `${VAR:-default}` are expanded in scalar values only (`$$` is a literal `$`), so a
//!   value from the environment is reported at the place it is written in the file.
//! - **Read** ([`raw`]): the file's shape (unknown keys, missing keys, wrong types). The same
//!   types generate `schemas/pipeline.schema.json` ([`json_schema`]).
//! - **Validate and build** ([`validate`]): names, URLs, CEL `when` expressions, duplicate lists,
//!   columns and fields, field types; then defaults are applied and the typed config is built.
//!
//! Typing: numbers and booleans must be unquoted (`"2000"` is a string) unless they come from
//! `${VAR}`, which is typed from the substituted text (the JSON Schema cannot express that, so
//! editors may flag such values). `graph.token_url` gets `{tenant}` replaced when built.
//!
//! Every stage keeps going after a problem, so one run reports all of them, each as
//! `file:line:col: message` (1-based; columns count characters). Nothing here panics on any
//! input. Secrets (`graph.client_secret`, passwords in `source.url`) live in [`Secret`] and
//! [`PgUrl`], which never print them.

mod interp;
mod model;
mod raw;
mod validate;
mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use model::*;

/// One problem in one file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem found in a set of pipeline files; `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigReport {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

fn problems(file: &str, mut issues: Vec<yaml::Issue>) -> Vec<Problem> {
    // File order reads best; the sort is stable, so one place keeps its discovery order.
    issues.sort_by_key(|(loc, _)| *loc);
    issues
        .into_iter()
        .map(|(loc, message)| Problem {
            file: file.to_owned(),
            line: loc.line,
            col: loc.col,
            message,
        })
        .collect()
}

fn load_one(
    file_name: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(PipelineConfig, validate::CrossRefs), Vec<Problem>> {
    let (root, issues) = match yaml::parse(text, env) {
        Ok((Some(root), issues)) => (root, issues),
        Ok((None, mut issues)) => {
            let msg = "the file is empty; expected a pipeline mapping (version, name, source, graph, sync)";
            issues.push((yaml::Loc::START, msg.into()));
            return Err(problems(file_name, issues));
        }
        Err(issues) => return Err(problems(file_name, issues)),
    };
    let mut reader = raw::Reader { issues };
    let partial = reader.file(&root);
    let built = validate::validate(&mut reader, &partial);
    match built {
        Some(ok) if reader.issues.is_empty() => Ok(ok),
        _ => {
            if reader.issues.is_empty() {
                // Unreachable by construction; never hand out a config that failed to build.
                reader
                    .issues
                    .push((yaml::Loc::START, "invalid pipeline file".into()));
            }
            Err(problems(file_name, reader.issues))
        }
    }
}

/// Parses, interpolates (from `env`) and validates one file's text. No IO: for tests and tools.
pub fn load_str(
    file_name: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineConfig, ConfigReport> {
    load_one(file_name, text, env)
        .map(|(config, _)| config)
        .map_err(|problems| ConfigReport { problems })
}

/// Reads, interpolates from the process environment, parses and validates every file, then
/// checks them against each other (a pipeline name or a list on the same site used twice).
/// All problems of all files are returned together.
pub fn load_files(paths: &[PathBuf]) -> Result<Vec<PipelineConfig>, ConfigReport> {
    load_files_located(paths).map(|v| v.into_iter().map(|l| l.config).collect())
}

/// A loaded pipeline with where things are written in its file (for checks done later, such as
/// `validate --db`, that report `file:line:col` too).
#[derive(Debug, Clone)]
pub struct LocatedPipeline {
    pub config: PipelineConfig,
    /// The file name as given.
    pub file: String,
    /// 1-based (line, col) of each `sync[i].table` value, in `config.sync` order.
    pub tables: Vec<(usize, usize)>,
    /// 1-based (line, col) of each `sync[i].fields` column key, per entry, in `fields` order.
    pub fields: Vec<Vec<(usize, usize)>>,
}

impl LocatedPipeline {
    /// Where sync entry `entry`'s mapping of `column` is written (the entry's `table:` when the
    /// column is not mapped).
    pub fn mapping_at(&self, entry: usize, column: &str) -> (usize, usize) {
        let table = self.tables.get(entry).copied().unwrap_or((1, 1));
        let Some(e) = self.config.sync.get(entry) else {
            return table;
        };
        e.fields
            .iter()
            .position(|f| f.column == column)
            .and_then(|i| self.fields.get(entry)?.get(i).copied())
            .unwrap_or(table)
    }
}

/// [`load_files`] keeping each file name and the positions of the `table:` values.
pub fn load_files_located(paths: &[PathBuf]) -> Result<Vec<LocatedPipeline>, ConfigReport> {
    let env = |name: &str| std::env::var(name).ok();
    let mut configs = Vec::new();
    let mut all = Vec::new();
    // (pipeline name → file), ((site, list) → (file, line, col)) for cross-file checks.
    let mut names: Vec<(String, String, yaml::Loc)> = Vec::new();
    let mut lists: Vec<(String, String, String, yaml::Loc)> = Vec::new();
    for path in paths {
        let file = display(path);
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                all.push(Problem {
                    file,
                    line: 1,
                    col: 1,
                    message: format!("cannot read the file: {e}"),
                });
                continue;
            }
        };
        match load_one(&file, &text, &env) {
            Err(mut problems) => all.append(&mut problems),
            Ok((config, refs)) => {
                let mut cross = Vec::new();
                if let Some((_, other, at)) = names.iter().find(|(n, _, _)| *n == config.name) {
                    cross.push((
                        refs.name,
                        format!(
                            "pipeline name `{}` is already used by {other}:{at}",
                            config.name
                        ),
                    ));
                }
                names.push((config.name.clone(), file.clone(), refs.name));
                let site = config.graph.site.key();
                for (list, loc) in &refs.lists {
                    let key = list.to_lowercase();
                    if let Some((.., other, at)) =
                        lists.iter().find(|(s, l, ..)| *s == site && *l == key)
                    {
                        cross.push((
                            *loc,
                            format!("list `{list}` on this site is already synced by {other}:{at}"),
                        ));
                    }
                    lists.push((site.clone(), key, file.clone(), *loc));
                }
                if cross.is_empty() {
                    configs.push(LocatedPipeline {
                        config,
                        file: file.clone(),
                        tables: refs.tables.iter().map(|l| (l.line, l.col)).collect(),
                        fields: refs
                            .fields
                            .iter()
                            .map(|f| f.iter().map(|l| (l.line, l.col)).collect())
                            .collect(),
                    });
                } else {
                    all.append(&mut problems(&file, cross));
                }
            }
        }
    }
    if all.is_empty() {
        Ok(configs)
    } else {
        Err(ConfigReport { problems: all })
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// The JSON Schema of a pipeline file, generated from the reader's types.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(raw::PipelineFile);
    serde_json::to_value(schema).unwrap_or_default()
}

/// The committed schema file's content: pretty JSON with a trailing newline.
pub fn json_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&json_schema()).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests;
