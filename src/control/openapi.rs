//! The OpenAPI 3.1 description of the control-plane API, generated from the handlers'
//! `#[utoipa::path]` annotations and the response types; served at `/openapi.json` and committed
//! as `schemas/openapi.json` (a test fails when that copy is stale; regenerate with
//! `SYNCBRIDGE_UPDATE_SCHEMA=1 cargo test --lib control::openapi`).
//!
//! Every operation needs the `bearer` scheme except the probes (`/health`, `/ready`, `/metrics`,
//! `/openapi.json`), matching [`super::auth::PUBLIC_PATHS`]. More routes join by adding their
//! paths here (or merging another `OpenApi` into [`document`]).

use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};

use super::auth::PUBLIC_PATHS;
use super::problem::{InvalidParam, Problem};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "SyncBridge control plane",
        description = "Operate running SyncBridge pipelines. Every route except the probes needs \
                       `Authorization: Bearer <token>` (control.tokens); a `read` token may GET \
                       only. Errors are RFC 9457 problem bodies."
    ),
    paths(
        super::health,
        super::ready,
        super::metrics_text,
        super::openapi_json,
        super::snapshot_status,
        super::snapshot_start,
        super::conflicts_list,
        super::conflict_resolve,
        super::pause_status,
        super::resume,
        super::meta::api::list_runs,
        super::meta::api::get_run,
        super::pipelines::list,
        super::pipelines::one,
        super::pipelines::dlq_list,
        super::pipelines::dlq_replay,
        super::catalog::get_inventory,
        super::catalog::list_tables,
        super::catalog::get_table,
        super::meta::history::row_history,
        super::cursors::cursors,
        super::cursors::reset,
        super::cursors::ledger::ledger,
        super::config_edit::get_config,
        super::config_edit::put_config,
        super::config_check::validate,
        super::config_check::list_columns,
        super::drift::check, super::drift::heal, super::drift::latest, super::drift::by_run,
        super::guard::status, super::guard::allow, super::guard::discard,
        super::ui::whoami,
    ),
    components(schemas(Problem, InvalidParam, super::TakeParam, super::cursors::ResetBody)),
    modifiers(&BearerSecurity)
)]
struct ApiDoc;

/// Declares the `bearer` scheme and requires it on every operation outside [`PUBLIC_PATHS`],
/// whose answers then include 401 and 403.
struct BearerSecurity;

impl Modify for BearerSecurity {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            if PUBLIC_PATHS.contains(&path.as_str()) {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
                let answers = &mut op.responses.responses;
                answers.insert(
                    "401".into(),
                    problem_response("No bearer token, or not one of control.tokens"),
                );
                answers.insert(
                    "403".into(),
                    problem_response("A `read` token on a route that changes something"),
                );
            }
        }
    }
}

fn problem_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            super::problem::PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
        .into()
}

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/openapi.json")
    }

    #[test]
    fn committed_openapi_is_current() {
        let fresh = document()
            .to_pretty_json()
            .expect("the document serializes")
            + "\n";
        let path = committed_path();
        if std::env::var_os("SYNCBRIDGE_UPDATE_SCHEMA").is_some() {
            std::fs::write(&path, &fresh).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == fresh,
            "{} is stale: regenerate with SYNCBRIDGE_UPDATE_SCHEMA=1 cargo test --lib \
             control::openapi",
            path.display()
        );
    }

    #[test]
    fn protected_operations_need_the_bearer_scheme() {
        let doc = serde_json::to_value(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 9, "{:?}", paths.keys());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let secured = op.get("security").is_some();
                assert_eq!(
                    secured,
                    !PUBLIC_PATHS.contains(&path.as_str()),
                    "{method} {path}"
                );
                for status in ["401", "403"] {
                    assert_eq!(
                        op["responses"].get(status).is_some(),
                        secured,
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_schema_reference_resolves() {
        fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                        out.push(r.to_string());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc = serde_json::to_value(document()).unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} is not in components.schemas"
            );
        }
    }
}
