//! The OpenAPI 3 description of what this API serves, generated from [`super::routes::ROUTES`]
//! (so it cannot list a path that is not served, nor miss one). Served at
//! `/ovirt-engine/api/openapi.json`; `docs/rest-openapi.json` is the checked-in copy, and a
//! test keeps the two identical.

use http::Method;
use serde_json::{json, Map, Value};

use super::routes::{Op, ROUTES};
use super::{API, SSO_LOGOUT, SSO_TOKEN};

fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|p| {
            json!({
                "name": p, "in": "path", "required": true,
                "schema": { "type": "string" },
                "description": format!("The {p}'s id"),
            })
        })
        .collect()
}

fn query(name: &str, ty: &str, desc: &str) -> Value {
    json!({ "name": name, "in": "query", "required": false, "schema": { "type": ty }, "description": desc })
}

fn body_schema(root: &str) -> Value {
    json!({
        "required": true,
        "description": format!("A <{root}> element (XML) or its JSON object"),
        "content": {
            "application/xml": { "schema": { "$ref": format!("#/components/schemas/{root}") } },
            "application/json": { "schema": { "$ref": format!("#/components/schemas/{root}") } },
        }
    })
}

fn doc_response(desc: &str, root: &str) -> Value {
    json!({
        "description": desc,
        "content": {
            "application/xml": { "schema": { "$ref": format!("#/components/schemas/{root}") } },
            "application/json": { "schema": { "$ref": format!("#/components/schemas/{root}") } },
        }
    })
}

/// The whole description as JSON.
pub fn document() -> Value {
    let mut paths = Map::new();
    let mut roots = std::collections::BTreeSet::new();
    for r in ROUTES {
        let full = if r.path == "/" {
            API.to_string()
        } else {
            format!("{API}{}", r.path)
        };
        let mut params = path_params(r.path);
        let is_list = r.method == Method::GET && r.reply.ends_with('s') && !r.path.ends_with('}');
        if r.method == Method::GET && r.op != Op::OpenApi {
            params.push(query(
                "follow",
                "string",
                "Comma-separated links to embed (e.g. disk_attachments,nics)",
            ));
        }
        // oVirt searches root collections only; `max` bounds every collection.
        if is_list && !r.path.contains('{') {
            params.push(query(
                "search",
                "string",
                "oVirt search: name=x, name=\"a b\", a=b and c=d, a=b or c=d (and binds tighter), status=up, storage.name=x, datacenter=x, correlation_id=x, sortby f asc|desc, page N",
            ));
            params.push(query(
                "case_sensitive",
                "boolean",
                "Text matches are case sensitive (default true)",
            ));
        }
        if is_list {
            params.push(query("max", "integer", "At most this many results"));
        }
        if r.op == Op::EventList {
            params.push(query("from", "integer", "Only events after this event id"));
        }
        if r.method == Method::DELETE {
            params.push(query("async", "boolean", "Answer before the removal is done"));
        }
        let mut responses = Map::new();
        roots.insert(r.reply);
        match r.method {
            Method::GET | Method::PUT => {
                responses.insert("200".into(), doc_response("The document", r.reply));
            }
            Method::DELETE => {
                roots.insert("action");
                responses.insert(
                    "200".into(),
                    doc_response("Removed: <action><status>complete</status></action>", "action"),
                );
            }
            Method::POST if r.reply == "action" => {
                responses.insert(
                    "200".into(),
                    doc_response("Done: <status>complete</status>", "action"),
                );
                responses.insert(
                    "202".into(),
                    doc_response(
                        "Accepted with <async>true</async>: <status>pending</status>",
                        "action",
                    ),
                );
            }
            _ => {
                responses.insert(
                    "201".into(),
                    json!({
                        "description": "Created; Location names the new object",
                        "headers": { "Location": { "schema": { "type": "string" } } },
                        "content": {
                            "application/xml": { "schema": { "$ref": format!("#/components/schemas/{}", r.reply) } },
                            "application/json": { "schema": { "$ref": format!("#/components/schemas/{}", r.reply) } },
                        }
                    }),
                );
                if matches!(
                    r.op,
                    Op::DiskAdd | Op::VmAdd | Op::VmAttAdd | Op::VmSnapAdd | Op::TemplateAdd
                ) {
                    params.push(json!({
                        "name": "Expect", "in": "header", "required": false,
                        "description": "201-created: answer once the storage work is done (else 202 at once)",
                        "schema": { "type": "string", "enum": ["201-created"] },
                    }));
                    responses.insert(
                        "202".into(),
                        doc_response(
                            "Accepted: the new object, locked while its storage work runs",
                            r.reply,
                        ),
                    );
                }
            }
        }
        for (code, desc) in [
            ("400", "Invalid request or failed command"),
            ("401", "Missing, invalid or expired token"),
            ("404", "No such object or path"),
            ("409", "The object is in a state that does not allow this"),
        ] {
            responses.insert(code.into(), doc_response(desc, "fault"));
        }
        let mut operation = json!({
            "operationId": format!("{:?}", r.op),
            "summary": r.summary,
            "parameters": params,
            "responses": responses,
            "tags": [r.path.split('/').nth(1).filter(|s| !s.is_empty()).unwrap_or("api")],
        });
        if let Some(b) = r.body {
            roots.insert(b);
            operation["requestBody"] = body_schema(b);
        }
        let entry = paths.entry(full).or_insert_with(|| Value::Object(Map::new()));
        entry[r.method.as_str().to_ascii_lowercase()] = operation;
    }
    paths.insert(
        SSO_TOKEN.into(),
        json!({ "post": {
            "operationId": "SsoToken", "summary": "Log in: OAuth password grant", "security": [], "tags": ["sso"],
            "requestBody": { "required": true, "content": { "application/x-www-form-urlencoded": { "schema": {
                "type": "object", "required": ["grant_type", "username", "password"],
                "properties": {
                    "grant_type": { "type": "string", "enum": ["password"] },
                    "scope": { "type": "string", "example": "ovirt-app-api" },
                    "username": { "type": "string", "example": "admin@internal" },
                    "password": { "type": "string" } } } } } },
            "responses": {
                "200": { "description": "A bearer token", "content": { "application/json": { "schema": {
                    "type": "object", "properties": {
                        "access_token": { "type": "string" }, "scope": { "type": "string" },
                        "exp": { "type": "string" }, "token_type": { "type": "string" } } } } } },
                "400": { "description": "Refused", "content": { "application/json": { "schema": {
                    "type": "object", "properties": { "error_code": { "type": "string" }, "error": { "type": "string" } } } } } }
            } } }),
    );
    paths.insert(
        SSO_LOGOUT.into(),
        json!({ "post": {
            "operationId": "SsoLogout", "summary": "Revoke a token", "security": [], "tags": ["sso"],
            "requestBody": { "content": { "application/x-www-form-urlencoded": { "schema": {
                "type": "object", "properties": { "token": { "type": "string" }, "scope": { "type": "string" } } } } } },
            "responses": { "200": { "description": "{}", "content": { "application/json": { "schema": { "type": "object" } } } } }
        } }),
    );
    let mut schemas = Map::new();
    roots.insert("fault");
    for root in roots {
        let schema = match root {
            "fault" => json!({ "type": "object", "xml": { "name": "fault" },
                "properties": { "reason": { "type": "string" }, "detail": { "type": "string" } } }),
            "action" => json!({ "type": "object", "xml": { "name": "action" },
                "properties": { "status": { "type": "string" }, "async": { "type": "boolean" },
                    "host": { "type": "object" }, "snapshot": { "type": "object" }, "force": { "type": "boolean" },
                    "fence_type": { "type": "string", "enum": ["status", "stop", "start", "restart", "manual"] },
                    "power_management": { "type": "object" } } }),
            "openapi" => json!({ "type": "object" }),
            r => json!({ "type": "object", "xml": { "name": r },
                "description": format!("oVirt's <{r}> (see oVirt/ovirt-engine-api-model); id and href are attributes"),
                "properties": { "id": { "type": "string", "xml": { "attribute": true } },
                    "href": { "type": "string", "xml": { "attribute": true } } },
                "additionalProperties": true }),
        };
        schemas.insert(root.to_string(), schema);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "oxvirt engine API (oVirt REST API v4)",
            "version": format!("4.5-oxvirt{}", env!("CARGO_PKG_VERSION")),
            "description": "The subset of oVirt's REST API v4 that oxvirt serves. XML by default, JSON with Accept: application/json. Authenticate at /ovirt-engine/sso/oauth/token and send Authorization: Bearer <token> and Version: 4.",
        },
        "servers": [{ "url": "/" }],
        "security": [{ "bearer": [] }, { "basic": [] }],
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer" },
                "basic": { "type": "http", "scheme": "basic" },
            },
            "schemas": schemas,
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_copy_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/rest-openapi.json");
        let want = serde_json::to_string_pretty(&document()).unwrap() + "\n";
        let have = std::fs::read_to_string(path).unwrap_or_default();
        if have != want {
            if std::env::var_os("OXVIRT_BLESS").is_some() {
                std::fs::write(path, &want).unwrap();
            } else {
                panic!(
                    "docs/rest-openapi.json is stale: run OXVIRT_BLESS=1 cargo test -p oxvirt-engine openapi"
                );
            }
        }
    }

    #[test]
    fn every_route_is_described() {
        let d = document();
        for r in ROUTES {
            let full = if r.path == "/" {
                API.to_string()
            } else {
                format!("{API}{}", r.path)
            };
            assert!(
                d["paths"][&full][r.method.as_str().to_ascii_lowercase()].is_object(),
                "{} {full}",
                r.method
            );
        }
    }
}
