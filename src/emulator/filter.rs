//! `$filter` for list items (graph-api.md §5.3): `fields/<name>` compared with
//! `eq ne lt gt le ge`, `startswith(fields/X,'p')`, combined with `and` / `or` and parentheses.
//!
//! Text compares case-insensitively (SharePoint's default collation). Booleans accept `1`/`0`.

use serde_json::Value;

use super::model::{Item, Kind, List, parse_time};

const MAX_FILTER_LEN: usize = 8_192;
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Lit {
    Str(String),
    Raw(String),
    Null,
}

#[derive(Debug, Clone)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cmp { field: String, op: Op, lit: Lit },
    StartsWith { field: String, prefix: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    LParen,
    RParen,
    Comma,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '\'' => {
                let mut v = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            v.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            v.push(*ch);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(v));
            }
            _ => {
                let start = i;
                while i < chars.len()
                    && !matches!(chars[i], ' ' | '\t' | '\n' | '\r' | '(' | ')' | ',' | '\'')
                {
                    i += 1;
                }
                out.push(Tok::Word(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect(&mut self, t: Tok) -> Result<(), String> {
        match self.next() {
            Some(x) if x == t => Ok(()),
            other => Err(format!("expected {t:?}, found {other:?}")),
        }
    }

    fn or(&mut self, depth: usize) -> Result<Expr, String> {
        let mut left = self.and(depth)?;
        while self.peek_word("or") {
            self.pos += 1;
            let right = self.and(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, String> {
        let mut left = self.primary(depth)?;
        while self.peek_word("and") {
            self.pos += 1;
            let right = self.primary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn primary(&mut self, depth: usize) -> Result<Expr, String> {
        if depth > MAX_DEPTH {
            return Err("filter nested too deeply".into());
        }
        match self.next() {
            Some(Tok::LParen) => {
                let e = self.or(depth + 1)?;
                self.expect(Tok::RParen)?;
                Ok(e)
            }
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("startswith") => {
                self.expect(Tok::LParen)?;
                let field = match self.next() {
                    Some(Tok::Word(f)) => field_name(&f)?,
                    other => return Err(format!("expected a field, found {other:?}")),
                };
                self.expect(Tok::Comma)?;
                let prefix = match self.next() {
                    Some(Tok::Str(s)) => s,
                    other => return Err(format!("expected a string, found {other:?}")),
                };
                self.expect(Tok::RParen)?;
                Ok(Expr::StartsWith { field, prefix })
            }
            Some(Tok::Word(w)) => {
                let field = field_name(&w)?;
                let op = match self.next() {
                    Some(Tok::Word(o)) => match o.to_ascii_lowercase().as_str() {
                        "eq" => Op::Eq,
                        "ne" => Op::Ne,
                        "lt" => Op::Lt,
                        "gt" => Op::Gt,
                        "le" => Op::Le,
                        "ge" => Op::Ge,
                        _ => return Err(format!("unsupported operator '{o}'")),
                    },
                    other => return Err(format!("expected an operator, found {other:?}")),
                };
                let lit = match self.next() {
                    Some(Tok::Str(s)) => Lit::Str(s),
                    Some(Tok::Word(w)) if w == "null" => Lit::Null,
                    Some(Tok::Word(w)) => Lit::Raw(w),
                    other => return Err(format!("expected a literal, found {other:?}")),
                };
                Ok(Expr::Cmp { field, op, lit })
            }
            other => Err(format!("unexpected token {other:?}")),
        }
    }
}

/// `fields/X` → `X`; the listItem properties `id`, `createdDateTime`, `lastModifiedDateTime` map to
/// their field equivalents.
fn field_name(w: &str) -> Result<String, String> {
    if let Some(f) = w.strip_prefix("fields/") {
        if f.is_empty() {
            return Err("empty field name".into());
        }
        return Ok(f.to_string());
    }
    match w {
        "id" => Ok("ID".into()),
        "createdDateTime" => Ok("Created".into()),
        "lastModifiedDateTime" => Ok("Modified".into()),
        _ => Err(format!("unsupported filter operand '{w}'")),
    }
}

pub fn parse(s: &str) -> Result<Expr, String> {
    if s.len() > MAX_FILTER_LEN {
        return Err("filter too long".into());
    }
    let toks = tokenize(s)?;
    let mut p = Parser { toks, pos: 0 };
    let e = p.or(0)?;
    if p.pos != p.toks.len() {
        return Err("unexpected trailing tokens".into());
    }
    Ok(e)
}

pub fn fields(e: &Expr, out: &mut Vec<String>) {
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => {
            fields(a, out);
            fields(b, out);
        }
        Expr::Cmp { field, .. } | Expr::StartsWith { field, .. } => out.push(field.clone()),
    }
}

/// Is `field` known on the list, and is it indexed? `None` = unknown field.
pub fn indexed(list: &List, field: &str) -> Option<bool> {
    match field {
        "ID" | "Created" | "Modified" | "AuthorLookupId" | "EditorLookupId" => return Some(true),
        "ContentType" | "_UIVersionString" => return Some(false),
        _ => {}
    }
    let col = list
        .column(field)
        .or_else(|| field.strip_suffix("LookupId").and_then(|b| list.column(b)))?;
    Some(col.indexed || col.unique)
}

#[derive(Debug)]
enum V {
    S(String),
    N(f64),
    B(bool),
    Many(Vec<V>),
    Missing,
}

fn item_value(list: &List, item: &Item, field: &str) -> V {
    match field {
        "ID" => return V::N(item.id as f64),
        "Created" => return V::N(item.created as f64),
        "Modified" => return V::N(item.modified as f64),
        "ContentType" => return V::S("item".into()),
        _ => {}
    }
    let col = list
        .column(field)
        .or_else(|| field.strip_suffix("LookupId").and_then(|b| list.column(b)));
    let Some(col) = col else { return V::Missing };
    let Some(v) = item.values.get(&col.name) else {
        return V::Missing;
    };
    let conv = |v: &Value| match (&col.kind, v) {
        (Kind::DateTime { .. }, Value::String(s)) => {
            parse_time(s).map(|t| V::N(t as f64)).unwrap_or(V::Missing)
        }
        (_, Value::String(s)) => V::S(s.to_lowercase()),
        (_, Value::Number(n)) => n.as_f64().map(V::N).unwrap_or(V::Missing),
        (_, Value::Bool(b)) => V::B(*b),
        _ => V::Missing,
    };
    match v {
        Value::Array(a) => V::Many(a.iter().map(conv).collect()),
        other => conv(other),
    }
}

fn cmp_one(v: &V, op: Op, lit: &Lit) -> bool {
    use std::cmp::Ordering;
    let ord: Option<Ordering> = match (v, lit) {
        (V::Missing, Lit::Null) => return matches!(op, Op::Eq),
        (_, Lit::Null) => return matches!(op, Op::Ne),
        (V::Missing, _) => return matches!(op, Op::Ne),
        (V::S(s), Lit::Str(l)) | (V::S(s), Lit::Raw(l)) => {
            Some(s.as_str().cmp(l.to_lowercase().as_str()))
        }
        (V::N(n), Lit::Str(l)) | (V::N(n), Lit::Raw(l)) => {
            let x = l
                .parse::<f64>()
                .ok()
                .or_else(|| parse_time(l).map(|t| t as f64));
            x.and_then(|x| n.partial_cmp(&x))
        }
        (V::B(b), Lit::Raw(l)) | (V::B(b), Lit::Str(l)) => {
            let x = match l.to_ascii_lowercase().as_str() {
                "1" | "true" => Some(true),
                "0" | "false" => Some(false),
                _ => None,
            };
            x.map(|x| b.cmp(&x))
        }
        (V::Many(vs), _) => {
            let any = vs.iter().any(|x| cmp_one(x, Op::Eq, lit));
            return match op {
                Op::Eq => any,
                Op::Ne => !any,
                _ => false,
            };
        }
    };
    let Some(o) = ord else { return false };
    match op {
        Op::Eq => o == Ordering::Equal,
        Op::Ne => o != Ordering::Equal,
        Op::Lt => o == Ordering::Less,
        Op::Gt => o == Ordering::Greater,
        Op::Le => o != Ordering::Greater,
        Op::Ge => o != Ordering::Less,
    }
}

pub fn eval(e: &Expr, list: &List, item: &Item) -> bool {
    match e {
        Expr::And(a, b) => eval(a, list, item) && eval(b, list, item),
        Expr::Or(a, b) => eval(a, list, item) || eval(b, list, item),
        Expr::Cmp { field, op, lit } => cmp_one(&item_value(list, item, field), *op, lit),
        Expr::StartsWith { field, prefix } => match item_value(list, item, field) {
            V::S(s) => s.starts_with(&prefix.to_lowercase()),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_forms() {
        for f in [
            "fields/Status eq 'Open'",
            "fields/Qty lt 600 and startswith(fields/Title,'ab')",
            "(fields/A eq 'x' or fields/B ne 'it''s') and fields/Active eq 1",
            "fields/When ge '2024-01-01T00:00:00Z'",
        ] {
            assert!(parse(f).is_ok(), "{f}");
        }
        for f in [
            "fields/A eq",
            "fields/A like 'x'",
            "Title eq 'x'",
            "(fields/A eq 'x'",
            "fields/A eq 'x",
        ] {
            assert!(parse(f).is_err(), "{f}");
        }
    }
}
