//! `${VAR}` / `${VAR:-default}` interpolation of scalar values.
//!
//! Syntax (compose-like): `${NAME}` is the variable's value (set but empty counts as set);
//! `${NAME:-default}` uses `default` when `NAME` is unset or empty; `$$` is a literal `$`;
//! any other `$` is kept as is (passwords may contain `$`). `NAME` is `[A-Za-z_][A-Za-z0-9_]*`.
//! A default is literal text up to the matching `}` (braces inside it must balance, so
//! `${URL:-http://h/{tenant}/x}` works); it is not expanded again, nor are environment values.

use super::yaml::{Issue, Loc};

/// Expands `value`; problems go to `issues`, located inside `raw` (the scalar's single-line
/// source text, when known) so that the column points at the offending `${`.
/// Returns the expanded text and whether any variable was substituted.
pub fn expand(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
    raw: Option<&str>,
    loc: Loc,
    issues: &mut Vec<Issue>,
) -> (String, bool) {
    if !value.contains('$') {
        return (value.to_owned(), false);
    }
    let mut out = String::with_capacity(value.len());
    let mut substituted = false;
    let mut rest = value;
    // How far we have searched in `raw`, so repeated references map to successive occurrences.
    let mut raw_from = 0usize;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let reference = &rest[pos..];
        let at = locate(raw, &mut raw_from, reference, loc);
        let Some(close) = matching_brace(body_start) else {
            issues.push((
                at,
                "unterminated `${`: expected `}` (write `$$` for a literal `$`)".into(),
            ));
            return (out, substituted);
        };
        let body = &body_start[..close];
        rest = &body_start[close + 1..];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if !is_var_name(name) {
            issues.push((
                at,
                format!(
                    "invalid variable reference `${{{body}}}`: expected `${{NAME}}` or `${{NAME:-default}}`"
                ),
            ));
            continue;
        }
        substituted = true;
        match (env(name), default) {
            (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => issues.push((
                at,
                format!("environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"),
            )),
        }
    }
    out.push_str(rest);
    (out, substituted)
}

/// Index of the `}` closing a `${`, skipping balanced `{...}` inside a default.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Column of the next occurrence of `reference`'s `${NAME` prefix in the raw source line.
/// Falls back to the scalar's start (multi-line or escaped scalars).
fn locate(raw: Option<&str>, from: &mut usize, reference: &str, loc: Loc) -> Loc {
    let Some(raw) = raw else { return loc };
    // Match on `${` plus the name part, which escapes cannot change for valid names.
    let head_len = reference[2..]
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(reference.len(), |n| n + 2);
    let head = &reference[..head_len];
    match raw.get(*from..).and_then(|r| r.find(head)) {
        Some(i) => {
            let byte = *from + i;
            *from = byte + head.len();
            Loc {
                line: loc.line,
                col: loc.col + raw[..byte].chars().count(),
            }
        }
        None => loc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn run(s: &str) -> (String, bool, Vec<Issue>) {
        let mut issues = Vec::new();
        let (out, sub) = expand(s, &env, Some(s), Loc { line: 3, col: 10 }, &mut issues);
        (out, sub, issues)
    }

    #[test]
    fn substitutes_and_escapes() {
        assert_eq!(run("a${SET}b").0, "avalueb");
        assert_eq!(run("${UNSET:-dflt}").0, "dflt");
        assert_eq!(run("${EMPTY:-dflt}").0, "dflt");
        assert_eq!(run("${EMPTY}").0, "");
        assert_eq!(run("${SET:-dflt}").0, "value");
        assert_eq!(
            run("${UNSET:-http://h/{tenant}/t}").0,
            "http://h/{tenant}/t"
        );
        assert_eq!(run("$${SET}").0, "${SET}");
        assert_eq!(run("pa$s$$word$").0, "pa$s$word$");
        assert!(!run("pa$$s").1, "escapes alone are not substitutions");
        assert!(run("${UNSET:-x}").1);
    }

    #[test]
    fn unset_variable_is_located_at_its_reference() {
        let (_, _, issues) = run("x ${SET} ${NOPE}");
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].0, Loc { line: 3, col: 19 });
        assert!(issues[0].1.contains("`NOPE` is not set"), "{}", issues[0].1);
    }

    #[test]
    fn malformed_references_are_errors() {
        let (_, _, issues) = run("${A");
        assert!(issues[0].1.contains("unterminated"));
        let (_, _, issues) = run("ab${1X}");
        assert_eq!(issues[0].0.col, 12);
        assert!(issues[0].1.contains("invalid variable reference"));
        let (_, _, issues) = run("${A-b}");
        assert!(issues[0].1.contains("invalid variable reference"));
    }
}
