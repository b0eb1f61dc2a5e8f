//! Routing (sharding): the first `routes[].when` CEL expression that is true for a row picks its
//! list; no match → the entry's default list. Expressions see every column of the row as a
//! variable with its typed value (ints, doubles, strings, bools, timestamps as RFC 3339 strings,
//! dates as `YYYY-MM-DD`, arrays as lists, NULL as `null`). An unchanged TOAST value is the
//! old value on a `REPLICA IDENTITY FULL` table, else the value last written to a text-like
//! field (the ledger's), else `null` (an unmapped column of a table that is not FULL).
//!
//! An expression that fails at run time (a type error, a missing column) is not a match, and the
//! failure is logged once per route: a row is never dropped because of a routing rule.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cel::{Context, Env, Program, Value as CelValue};

use super::row::{Cell, Row};
use crate::config::SyncEntry;

/// Compiled routes of one sync entry.
pub struct Router {
    default_list: String,
    /// The standard library, built once (building it per row would dominate routing cost).
    env: Arc<Env>,
    routes: Vec<CompiledRoute>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("default_list", &self.default_list)
            .field("routes", &self.routes)
            .finish()
    }
}

struct CompiledRoute {
    when: String,
    program: Program,
    list: String,
    warned: AtomicBool,
}

impl std::fmt::Debug for CompiledRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRoute")
            .field("when", &self.when)
            .field("list", &self.list)
            .finish()
    }
}

impl Router {
    /// Compiles every route. Validation already parsed them, so an error here is a bug or a CEL
    /// feature the parser accepts but the compiler does not; it is reported with the expression.
    pub fn new(entry: &SyncEntry) -> Result<Router, String> {
        let routes = entry
            .routes
            .iter()
            .map(|r| {
                Program::compile(&r.when)
                    .map(|program| CompiledRoute {
                        when: r.when.clone(),
                        program,
                        list: r.list.clone(),
                        warned: AtomicBool::new(false),
                    })
                    .map_err(|e| format!("route `{}`: {e}", r.when))
            })
            .collect::<Result<_, _>>()?;
        Ok(Router {
            default_list: entry.list.clone(),
            env: Arc::new(Env::stdlib()),
            routes,
        })
    }

    /// The display name of the list `row` belongs in.
    pub fn route(&self, table: &str, row: &Row) -> &str {
        if self.routes.is_empty() {
            return &self.default_list;
        }
        let mut ctx = Context::with_env(self.env.clone());
        for (name, cell) in row {
            ctx.add_variable_from_value(name.clone(), to_cel(cell));
        }
        for r in &self.routes {
            match r.program.execute(&ctx) {
                Ok(CelValue::Bool(true)) => return &r.list,
                Ok(CelValue::Bool(false)) => {}
                Ok(other) => warn_once(r, table, &format!("evaluated to {other:?}, not a bool")),
                Err(e) => warn_once(r, table, &e.to_string()),
            }
        }
        &self.default_list
    }
}

fn warn_once(r: &CompiledRoute, table: &str, why: &str) {
    if !r.warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(%table, when = %r.when, list = %r.list,
            "route expression failed ({why}); treating it as no match (logged once per route)");
    }
}

fn to_cel(cell: &Cell) -> CelValue {
    match cell {
        Cell::Null | Cell::Unchanged => CelValue::Null,
        Cell::Bool(b) => CelValue::Bool(*b),
        Cell::Int(i) => CelValue::Int(*i),
        Cell::Float(f) => CelValue::Float(*f),
        Cell::Decimal(s) => s
            .parse::<f64>()
            .map_or_else(|_| CelValue::String(Arc::new(s.clone())), CelValue::Float),
        Cell::Bytes(b) => CelValue::Bytes(Arc::new(b.clone())),
        Cell::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        other => CelValue::String(Arc::new(other.to_text().unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn entry(routes: &str) -> SyncEntry {
        let yaml = format!(
            "version: 1\nname: t\nsource: {{ url: 'postgres://u@h/d' }}\ngraph: {{ tenant: t.onmicrosoft.com, client_id: 11111111-2222-3333-4444-555555555555, client_secret: s, site: 'h.sharepoint.com:/sites/x' }}\nsync:\n  - table: public.t\n    list: Default\n    fields: {{ a: A }}\n    routes:\n{routes}"
        );
        load_str("t.yaml", &yaml, &|_| None).unwrap().sync.remove(0)
    }

    #[test]
    fn first_match_wins_and_default_otherwise() {
        let r = Router::new(&entry(
            "      - { when: \"status == 'archived'\", list: Archive }\n      - { when: 'amount > 100.0', list: Big }\n",
        ))
        .unwrap();
        let row = |status: &str, amount: &str| -> Row {
            [
                ("status".to_string(), Cell::Text(status.into())),
                ("amount".to_string(), Cell::Decimal(amount.into())),
            ]
            .into_iter()
            .collect()
        };
        assert_eq!(r.route("t", &row("archived", "500")), "Archive");
        assert_eq!(r.route("t", &row("open", "500.5")), "Big");
        assert_eq!(r.route("t", &row("open", "5")), "Default");
        // A failing expression (no such column) is no match, never an error.
        let r = Router::new(&entry("      - { when: 'missing > 1', list: X }\n")).unwrap();
        assert_eq!(r.route("t", &row("open", "5")), "Default");
    }
}
