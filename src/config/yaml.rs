//! YAML text → a small tree of nodes that remember where they came from.
//!
//! We build our own tree from the event stream of `serde-saphyr`'s parser (re-exported
//! `granit_parser`) instead of deserializing straight into structs, because serde stops at the
//! first error while `validate` must report every problem at once, each at its own `line:col`.
//! Interpolation runs on this tree (scalar values only), so a value produced by `${VAR}` keeps the
//! location of the scalar it was written in, and comments are never interpolated.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, Span};

use super::interp;

/// Deeper nesting than this is no pipeline file; the limit keeps recursion (and `Drop`) shallow.
const MAX_DEPTH: usize = 64;
/// Upper bound on nodes after alias expansion ("billion laughs" protection).
const MAX_NODES: usize = 100_000;

/// A 1-based position in the original file (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Loc {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
}

impl Loc {
    /// The start of the file.
    pub const START: Loc = Loc { line: 1, col: 1 };
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A scalar after interpolation.
#[derive(Debug, Clone)]
pub struct Scalar {
    /// The value (escapes processed, `${VAR}` substituted).
    pub text: String,
    /// Written without quotes: only plain scalars can be `null`, numbers or booleans.
    pub plain: bool,
    /// At least one `${VAR}` was substituted: the value came (partly) from the environment,
    /// so it is typed from its text whatever its quoting, and messages do not echo it.
    pub interpolated: bool,
    /// Interpolation failed (already reported): readers skip the value without a second message.
    pub broken: bool,
}

impl Scalar {
    /// YAML 1.2 core-schema null.
    pub fn is_null(&self) -> bool {
        self.plain
            && !self.interpolated
            && !self.broken
            && matches!(self.text.as_str(), "" | "~" | "null" | "Null" | "NULL")
    }
}

/// A node's content.
#[derive(Debug, Clone)]
pub enum Kind {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Entries in file order; duplicate keys are kept (the reader reports them).
    Map(Vec<(Node, Node)>),
}

/// A YAML node and where it starts.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    pub loc: Loc,
}

impl Node {
    /// A short name of the node's kind for "expected X, found Y" messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar(s) if s.is_null() => "null",
            Kind::Scalar(_) => "a scalar",
            Kind::Seq(_) => "a sequence",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// A problem found while reading YAML.
pub type Issue = (Loc, String);

const TAGS_UNSUPPORTED: &str = "YAML tags are not supported in pipeline files";

/// Where a node's tag (`!!int`) is written, which is before the node's own span.
fn tag_loc(span: &Span) -> Loc {
    span.tag_start.as_ref().map_or_else(
        || loc_of(span),
        |m| Loc {
            line: m.line(),
            col: m.col() + 1,
        },
    )
}

fn loc_of(span: &Span) -> Loc {
    Loc {
        line: span.start.line(),
        col: span.start.col() + 1,
    }
}

enum Open {
    Seq {
        loc: Loc,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        loc: Loc,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// Parses one YAML document into a tree and interpolates its scalar values with `env`.
///
/// Returns the tree (`None` for an empty document) and the problems that do not stop reading
/// (interpolation, tags). Syntax errors end parsing (the parser cannot recover inside a
/// document) and are returned as `Err`.
pub fn parse(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Option<Node>, Vec<Issue>), Vec<Issue>> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut issues = Vec::new();
    let mut stack: Vec<Open> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut nodes = 0usize;

    for event in Parser::new_from_str(text) {
        let (event, span) = match event {
            Ok(ev) => ev,
            Err(e) => {
                let m = e.marker();
                let loc = Loc {
                    line: m.line().max(1),
                    col: m.col() + 1,
                };
                return Err(vec![(loc, format!("invalid YAML: {}", e.info()))]);
            }
        };
        let loc = loc_of(&span);
        let finished = match event {
            Event::DocumentStart(..) => {
                documents += 1;
                if documents > 1 {
                    let msg = "a pipeline file holds one YAML document; found a second one";
                    return Err(vec![(loc, msg.into())]);
                }
                continue;
            }
            Event::Scalar(value, style, anchor, tag) => {
                if tag.is_some() {
                    issues.push((tag_loc(&span), TAGS_UNSUPPORTED.into()));
                }
                let plain = matches!(style, ScalarStyle::Plain);
                let raw = single_line_source(&lines, &span);
                let before = issues.len();
                let (text, interpolated) = interp::expand(&value, env, raw, loc, &mut issues);
                let node = Node {
                    kind: Kind::Scalar(Scalar {
                        text,
                        plain,
                        interpolated,
                        broken: issues.len() != before,
                    }),
                    loc,
                };
                if anchor != 0 {
                    anchors.insert(anchor, node.clone());
                }
                node
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if stack.len() >= MAX_DEPTH => {
                return Err(vec![(
                    loc,
                    format!("nesting deeper than {MAX_DEPTH} levels"),
                )]);
            }
            Event::SequenceStart(_, anchor, tag) => {
                if tag.is_some() {
                    issues.push((tag_loc(&span), TAGS_UNSUPPORTED.into()));
                }
                stack.push(Open::Seq {
                    loc,
                    anchor,
                    items: Vec::new(),
                });
                continue;
            }
            Event::MappingStart(_, anchor, tag) => {
                if tag.is_some() {
                    issues.push((tag_loc(&span), TAGS_UNSUPPORTED.into()));
                }
                stack.push(Open::Map {
                    loc,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(open) = stack.pop() else { continue };
                let (node, anchor) = match open {
                    Open::Seq { loc, anchor, items } => (
                        Node {
                            kind: Kind::Seq(items),
                            loc,
                        },
                        anchor,
                    ),
                    Open::Map {
                        loc,
                        anchor,
                        entries,
                        ..
                    } => (
                        Node {
                            kind: Kind::Map(entries),
                            loc,
                        },
                        anchor,
                    ),
                };
                if anchor != 0 {
                    anchors.insert(anchor, node.clone());
                }
                node
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some(target) => {
                    nodes += count(target);
                    if nodes > MAX_NODES {
                        return Err(vec![(loc, "aliases expand to too large a document".into())]);
                    }
                    // The copy keeps the anchor's locations: that is where its text is written.
                    target.clone()
                }
                None => return Err(vec![(loc, "alias to an unknown anchor".into())]),
            },
            _ => continue,
        };
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(vec![(loc, "document too large".into())]);
        }
        match stack.last_mut() {
            None => root = Some(finished),
            Some(Open::Seq { items, .. }) => items.push(finished),
            Some(Open::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(finished),
                Some(k) => entries.push((k, finished)),
            },
        }
    }
    Ok((root, issues))
}

/// The source text of a scalar that sits on one line (to place `${VAR}` problems exactly).
fn single_line_source<'a>(lines: &[&'a str], span: &Span) -> Option<&'a str> {
    if span.start.line() != span.end.line() {
        return None;
    }
    let line = lines.get(span.start.line().checked_sub(1)?)?;
    let start = span.start.col();
    let len = span.end.col().checked_sub(start)?;
    let begin = line.char_indices().nth(start).map(|(i, _)| i)?;
    let rest = &line[begin..];
    let end = rest.char_indices().nth(len).map_or(rest.len(), |(i, _)| i);
    Some(&rest[..end])
}

fn count(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar(_) => 1,
        Kind::Seq(items) => 1 + items.iter().map(count).sum::<usize>(),
        Kind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count(k) + count(v))
                .sum::<usize>()
        }
    }
}
