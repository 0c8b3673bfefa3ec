//! The API's OpenAPI 3.1 document and its interactive docs page.
//!
//! The document is derived from the code: each handler carries a
//! `#[utoipa::path]` annotation (method, path, parameters, body, every status it
//! answers) and the JSON types derive `utoipa::ToSchema` from the same structs
//! serde reads and writes, so a field cannot change without the document
//! changing. [`ApiDoc`] lists the handlers; the unit tests below fail when a
//! route is registered without being listed (or listed without being
//! registered) and check real answers against the schemas.
//!
//! `GET /api/v1/openapi.json` serves the document; `GET /api/v1/docs/` serves
//! Swagger UI, whose files are built into the binary (utoipa-swagger-ui's
//! `vendored` feature), so the page works without any network. Every server
//! answers both itself: they are never forwarded to the leader.

use std::sync::{Arc, OnceLock};

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::OpenApi;

use super::error::{Error, ErrorBody, Result};
use super::{changefeeds, dashboard, executors, resource, status};

/// Where the document is served.
pub const SPEC_PATH: &str = "/api/v1/openapi.json";
/// Where the docs page is served (with the trailing slash: its files are
/// relative to it).
pub const DOCS_PATH: &str = "/api/v1/docs/";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "flotilla",
        description = "The control plane of a fleet of executors running changefeeds. \
            Errors are JSON `{\"code\", \"message\"}`; `code` is stable. On a server that \
            does not lead, every `/api/v1/` route but `/api/v1/status`, the document and \
            the docs page is forwarded to the leader (503 `no_leader` when there is none).",
        license(name = "Apache-2.0"),
    ),
    paths(
        executors::register,
        executors::list,
        executors::heartbeat,
        executors::get,
        executors::deregister,
        executors::watch,
        changefeeds::create,
        changefeeds::create_batch,
        changefeeds::list,
        changefeeds::get,
        changefeeds::update,
        changefeeds::delete,
        changefeeds::pause,
        changefeeds::resume,
        status::healthz,
        status::readyz,
        status::metrics,
        status::status,
        spec,
        docs_redirect,
        docs,
        dashboard::index,
        dashboard::script,
        dashboard::style,
    ),
    // Schemas of bodies are collected from the handlers; those only parameters
    // use are listed here.
    components(schemas(ErrorBody, executors::LabelFilter)),
    modifiers(&SecuritySchemes, &OptionalBodies),
    tags(
        (name = "executors", description = "Registration, heartbeats and the live registry (leader)"),
        (name = "changefeeds", description = "Changefeeds, stored in etcd (leader)"),
        (name = "operations", description = "Probes, metrics, status and these docs (every server)"),
    ),
)]
pub struct ApiDoc;

/// The bearer schemes: an executor's own token (from its registration) and
/// the operators' admin token (`server.admin_token_file`).
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut scheme = Http::new(HttpAuthScheme::Bearer);
            scheme.description = Some(description.to_owned());
            SecurityScheme::Http(scheme)
        };
        components.add_security_scheme(
            "executor_token",
            bearer("The token returned by the executor's registration."),
        );
        components.add_security_scheme(
            "admin_token",
            bearer(
                "The admin token (`server.admin_token_file`). Changefeed writes need it when \
                 the server has one; it also deregisters any executor.",
            ),
        );
    }
}

/// A body a handler takes as `Option<T>` may be left out (empty), but is
/// never JSON `null`: the derive says `oneOf: [T, null]`; the document says
/// `T`, not required.
struct OptionalBodies;

impl utoipa::Modify for OptionalBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{Schema, SchemaType, Type};
        use utoipa::openapi::{RefOr, Required};
        let is_null = |schema: &RefOr<Schema>| matches!(schema, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null));
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                let Some(RefOr::T(body)) = operation.request_body.as_mut() else {
                    continue;
                };
                let mut optional = false;
                for content in body.content.values_mut() {
                    let RefOr::T(content) = content else { continue };
                    if let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema {
                        if let [schema, null] = one_of.items.as_slice() {
                            if is_null(null) {
                                content.schema = Some(schema.clone());
                                optional = true;
                            }
                        }
                    }
                }
                if optional {
                    body.required = Some(Required::False);
                }
            }
        }
    }
}

/// The document as JSON, built once.
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes")
    })
}

/// An actix route pattern as an OpenAPI path: `{file:.*}` -> `{file}`.
fn openapi_path(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut in_regex = false;
    for c in pattern.chars() {
        match c {
            ':' if out.rfind('{') > out.rfind('}') => in_regex = true,
            '}' => {
                in_regex = false;
                out.push(c);
            }
            _ if in_regex => {}
            _ => out.push(c),
        }
    }
    out
}

/// The `Allow` header of a 405 on the route `pattern`: the methods the
/// document gives it (a unit test checks they are the ones served).
pub(super) fn allowed_methods(pattern: &str) -> Option<&'static str> {
    static ALLOW: OnceLock<std::collections::HashMap<String, String>> = OnceLock::new();
    let allow = ALLOW.get_or_init(|| {
        let document: serde_json::Value =
            serde_json::from_str(document()).expect("the document is JSON");
        document["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(path, item)| {
                let methods: Vec<String> = item
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, op)| op.get("responses").is_some())
                    .map(|(method, _)| method.to_uppercase())
                    .collect();
                (path.clone(), methods.join(", "))
            })
            .collect()
    });
    allow.get(&openapi_path(pattern)).map(String::as_str)
}

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(SPEC_PATH).get(spec))
        .service(resource("/api/v1/docs").get(docs_redirect))
        .service(resource("/api/v1/docs/{file:.*}").get(docs));
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    operation_id = "openapi_document",
    tag = "operations",
    summary = "The OpenAPI document of this API",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json",
               body = Object)),
)]
pub(super) async fn spec() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}

/// The docs page lives under a trailing slash (its files are relative).
#[utoipa::path(
    get,
    path = "/api/v1/docs",
    operation_id = "docs_redirect",
    tag = "operations",
    summary = "Redirects to the docs page",
    responses((status = 308, description = "To `/api/v1/docs/`",
               headers(("Location" = String)))),
)]
pub(super) async fn docs_redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, DOCS_PATH))
        .finish()
}

fn swagger_config() -> Arc<utoipa_swagger_ui::Config<'static>> {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            Arc::new(
                utoipa_swagger_ui::Config::new([SPEC_PATH])
                    // Swagger UI would otherwise send the document to an
                    // outside validator.
                    .validator_url("none")
                    .try_it_out_enabled(true)
                    .persist_authorization(true),
            )
        })
        .clone()
}

/// The interactive docs page (Swagger UI) and its files, from the binary.
#[utoipa::path(
    get,
    path = "/api/v1/docs/{file}",
    operation_id = "docs_page",
    tag = "operations",
    summary = "The interactive docs page (Swagger UI) and its files",
    description = "`/api/v1/docs/` is the page; the other names are its scripts, styles and \
        icons, all built into the binary.",
    params(("file" = String, Path, description = "Empty for the page, or one of its files")),
    responses(
        (status = 200, description = "The page or the file", content_type = "text/html", body = String),
        (status = 404, description = "`not_found`: no such file", body = ErrorBody),
    ),
)]
pub(super) async fn docs(file: web::Path<String>) -> Result<HttpResponse> {
    let file = file.into_inner();
    match utoipa_swagger_ui::serve(&file, swagger_config()) {
        Ok(Some(found)) => {
            let mut response = HttpResponse::Ok();
            if found.gzpipped {
                response.insert_header(header::ContentEncoding::Gzip);
            }
            Ok(response
                .content_type(found.content_type)
                .body(found.bytes.into_owned()))
        }
        Ok(None) => Err(Error::NotFound(format!(
            "no file {file:?} in the docs page"
        ))),
        Err(e) => Err(Error::Internal(format!("docs page: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use actix_web::http::{Method, StatusCode};
    use actix_web::{test as atest, App};
    use serde_json::Value;

    use super::*;
    use crate::http::{configure, test_support, REGISTERED};

    const METHODS: [Method; 5] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ];

    fn parsed() -> Value {
        serde_json::from_str(document()).expect("the document is JSON")
    }

    /// Documented operations: path -> methods.
    fn documented(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
        doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .map(|(path, item)| {
                let methods = item
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| METHODS.iter().any(|m| m.as_str().eq_ignore_ascii_case(k)))
                    .map(|k| k.to_uppercase())
                    .collect();
                (path.clone(), methods)
            })
            .collect()
    }

    fn collect_refs(value: &Value, refs: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    refs.push(r.clone());
                }
                map.values().for_each(|v| collect_refs(v, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, refs)),
            _ => {}
        }
    }

    #[test]
    fn actix_patterns_become_openapi_paths() {
        assert_eq!(openapi_path("/a/{id}/b"), "/a/{id}/b");
        assert_eq!(
            openapi_path("/api/v1/docs/{file:.*}"),
            "/api/v1/docs/{file}"
        );
        assert_eq!(openapi_path("/x/{a:[0-9]+}/{b}"), "/x/{a}/{b}");
    }

    #[test]
    fn the_document_is_openapi_3_1_with_resolvable_refs_and_unique_operation_ids() {
        let doc = parsed();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in &refs {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            assert!(schemas.contains_key(name), "{r} does not resolve");
        }
        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .expect("securitySchemes");
        assert_eq!(schemes["executor_token"]["scheme"], "bearer");
        assert_eq!(schemes["admin_token"]["scheme"], "bearer");

        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().expect("operationId");
                assert!(ids.insert(id.to_owned()), "operationId {id} twice");
                for requirement in op["security"].as_array().into_iter().flatten() {
                    for scheme in requirement.as_object().unwrap().keys() {
                        assert!(schemes.contains_key(scheme), "{method} {path}: {scheme}");
                    }
                }
                let responses = op["responses"].as_object().expect("responses");
                assert!(
                    responses
                        .keys()
                        .any(|s| s.starts_with('2') || s.starts_with('3')),
                    "{method} {path} documents no success"
                );
                // Every error answer is the one error body.
                for (status, response) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            response["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/Error",
                            "{method} {path} {status}"
                        );
                    }
                }
                for param in op["parameters"].as_array().into_iter().flatten() {
                    if param["in"] == "path" {
                        let name = param["name"].as_str().unwrap();
                        assert!(path.contains(&format!("{{{name}}}")), "{path}: {name}");
                    }
                }
            }
        }
        let codes: Vec<&str> = schemas["Error"]["properties"]["code"]["enum"]
            .as_array()
            .expect("the error codes")
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let all: Vec<&str> = crate::error_code::ErrorCode::ALL
            .iter()
            .map(|c| c.as_str())
            .collect();
        assert_eq!(codes, all);
    }

    /// The routes the app registers (every one goes through `resource()`),
    /// and for each the methods it answers (anything but 405), against the
    /// document: a route added without docs, or docs without a route, fails.
    #[actix_web::test]
    async fn every_served_route_and_method_is_documented_and_nothing_else() {
        REGISTERED.with(|r| r.borrow_mut().clear());
        let state = web::Data::new(test_support::unreachable_etcd_state().await);
        let app = atest::init_service(App::new().configure(configure(state))).await;
        let registered: BTreeSet<String> =
            REGISTERED.with(|r| r.borrow().iter().map(|p| openapi_path(p)).collect());
        let documented = documented(&parsed());
        assert_eq!(
            registered,
            documented.keys().cloned().collect::<BTreeSet<_>>(),
            "registered routes (left) differ from documented paths (right)"
        );
        for (path, methods) in &documented {
            let concrete = path.replace("{id}", "probe-1").replace("{file}", "probe-1");
            assert!(!concrete.contains('{'), "a parameter to fill in {path}");
            let mut served = BTreeSet::new();
            for method in METHODS {
                let req = atest::TestRequest::default()
                    .method(method.clone())
                    .uri(&concrete)
                    .to_request();
                let resp = atest::call_service(&app, req).await;
                if resp.status() != StatusCode::METHOD_NOT_ALLOWED {
                    served.insert(method.to_string());
                    continue;
                }
                // RFC 9110: a 405 lists what the route allows.
                let allow = resp.headers().get(header::ALLOW).expect("Allow on a 405");
                let allow: BTreeSet<String> = allow
                    .to_str()
                    .unwrap()
                    .split(", ")
                    .map(str::to_owned)
                    .collect();
                assert_eq!(&allow, methods, "Allow of {method} {path}");
            }
            assert_eq!(&served, methods, "{path}: served (left) vs documented");
        }
    }

    #[actix_web::test]
    async fn the_document_and_the_docs_page_are_served() {
        let state = web::Data::new(test_support::unreachable_etcd_state().await);
        let app = atest::init_service(App::new().configure(configure(state))).await;

        let resp =
            atest::call_service(&app, atest::TestRequest::get().uri(SPEC_PATH).to_request()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers().get(header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
        let body: Value = serde_json::from_slice(&atest::read_body(resp).await).unwrap();
        assert_eq!(body, parsed());

        let resp = atest::call_service(
            &app,
            atest::TestRequest::get().uri("/api/v1/docs").to_request(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(resp.headers().get(header::LOCATION).unwrap(), DOCS_PATH);

        let resp =
            atest::call_service(&app, atest::TestRequest::get().uri(DOCS_PATH).to_request()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let page = String::from_utf8(atest::read_body(resp).await.to_vec()).unwrap();
        // Every script and style the page loads is ours, and is served.
        let mut assets = 0;
        for attr in ["src=\"", "href=\""] {
            for (i, _) in page.match_indices(attr) {
                let rest = &page[i + attr.len()..];
                let target = &rest[..rest.find('"').unwrap()];
                assert!(!target.contains("://"), "the page loads {target}");
                let uri = format!("{DOCS_PATH}{}", target.trim_start_matches("./"));
                let resp =
                    atest::call_service(&app, atest::TestRequest::get().uri(&uri).to_request())
                        .await;
                assert_eq!(resp.status(), StatusCode::OK, "{uri}");
                assets += 1;
            }
        }
        assert!(assets >= 4, "{page}");

        // The initializer points Swagger UI at our document, with no validator.
        let resp = atest::call_service(
            &app,
            atest::TestRequest::get()
                .uri("/api/v1/docs/swagger-initializer.js")
                .to_request(),
        )
        .await;
        let init = String::from_utf8(atest::read_body(resp).await.to_vec()).unwrap();
        assert!(init.contains(SPEC_PATH), "{init}");
        assert!(init.contains("\"validatorUrl\": \"none\""), "{init}");

        let resp = atest::call_service(
            &app,
            atest::TestRequest::get()
                .uri("/api/v1/docs/nope.js")
                .to_request(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body: Value = serde_json::from_slice(&atest::read_body(resp).await).unwrap();
        assert_eq!(body["code"], "not_found");
    }
}
