//! The REST API's OpenAPI 3.0 description, generated from the protos'
//! descriptors (with their comments as descriptions), so that it says what
//! the server sends: `docs/openapi.json` is this document, and a test
//! fails when the two differ (`CROSSFADE_WRITE_OPENAPI=1 cargo test -p
//! crossfade-coordinator openapi` rewrites the file).

use std::collections::BTreeMap;

use crossfade_proto::json::{ENUM_PREFIXES, ROLLING_DEPLOY_CONFIG, pool};
use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value as Json, json};

/// One operation of the API.
struct Operation {
    method: &'static str,
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    /// The request body's message (`None`: no body).
    body: Option<Body>,
    /// The response's message.
    response: &'static str,
    /// The success status.
    status: &'static str,
    /// Query parameters: name, schema, description.
    query: &'static [(&'static str, &'static str, &'static str)],
}

enum Body {
    /// A message, less the fields the path gives.
    Message(&'static str, &'static [&'static str]),
    /// `PATCH /v1/endpoints/{name}`'s own object.
    Patch,
}

const CONTROLS: [(&str, &str, &str); 5] = [
    (
        "/v1/endpoints/{name}/pause_promotion",
        "pause_promotion",
        "Pause the promotion in progress: no new step (a step under way finishes).",
    ),
    (
        "/v1/endpoints/{name}/resume_promotion",
        "resume_promotion",
        "Resume a paused promotion.",
    ),
    (
        "/v1/endpoints/{name}/cancel_promotion",
        "cancel_promotion",
        "Cancel: traffic moves back step by step, then CANCELED.",
    ),
    (
        "/v1/endpoints/{name}/force_cancel_promotion",
        "force_cancel_promotion",
        "All traffic back to the previous deployment at once.",
    ),
    (
        "/v1/endpoints/{name}/force_roll_forward_promotion",
        "force_roll_forward_promotion",
        "All traffic to the candidate at once.",
    ),
];

fn operations() -> Vec<Operation> {
    let mut ops = vec![
        Operation {
            method: "get",
            path: "/v1/endpoints",
            id: "list_endpoints",
            summary: "Every endpoint.",
            body: None,
            response: "crossfade.v1.ListEndpointsResponse",
            status: "200",
            query: &[],
        },
        Operation {
            method: "post",
            path: "/v1/endpoints",
            id: "create_endpoint",
            summary: "Create an endpoint (and start its first deployment when a template is given).",
            body: Some(Body::Message("crossfade.v1.CreateEndpointRequest", &[])),
            response: "crossfade.v1.Endpoint",
            status: "201",
            query: &[],
        },
        Operation {
            method: "get",
            path: "/v1/endpoints/{name}",
            id: "get_endpoint",
            summary: "An endpoint: its deployments, `promotion_settings`, `in_progress_promotion` (with `percent_traffic_to_new_version`), replicas and events.",
            body: None,
            response: "crossfade.v1.Endpoint",
            status: "200",
            query: &[(
                "event_limit",
                "uint32",
                "Latest events to include, 0..=1000 (default 50).",
            )],
        },
        Operation {
            method: "patch",
            path: "/v1/endpoints/{name}",
            id: "update_endpoint",
            summary: "Change `promotion_settings` (Baseten's shape; only the keys given change), `scaling` (likewise), `aliases` or `selector` (each replaced whole).",
            body: Some(Body::Patch),
            response: "crossfade.v1.Endpoint",
            status: "200",
            query: &[],
        },
        Operation {
            method: "delete",
            path: "/v1/endpoints/{name}",
            id: "delete_endpoint",
            summary: "Delete an endpoint, stopping its replicas.",
            body: None,
            response: "crossfade.v1.DeleteEndpointResponse",
            status: "200",
            query: &[("force", "bool", "Even with a promotion under way.")],
        },
        Operation {
            method: "get",
            path: "/v1/endpoints/{name}/history",
            id: "history",
            summary: "Every deployment and promotion of the endpoint, newest first.",
            body: None,
            response: "crossfade.v1.HistoryResponse",
            status: "200",
            query: &[(
                "limit",
                "uint32",
                "Most promotions, 0..=1000; 0: every one.",
            )],
        },
        Operation {
            method: "post",
            path: "/v1/endpoints/{name}/promote",
            id: "promote",
            summary: "Promote a template, or a kept deployment (`deployment_id`: a rollback).",
            body: Some(Body::Message("crossfade.v1.PromoteRequest", &["endpoint"])),
            response: "crossfade.v1.PromoteResponse",
            status: "200",
            query: &[],
        },
    ];
    for (path, id, summary) in CONTROLS {
        ops.push(Operation {
            method: "post",
            path,
            id,
            summary,
            body: Some(Body::Message(
                "crossfade.v1.PromotionControlRequest",
                &["endpoint"],
            )),
            response: "crossfade.v1.Promotion",
            status: "200",
            query: &[],
        });
    }
    ops.extend([
        Operation {
            method: "get",
            path: "/v1/workers",
            id: "list_workers",
            summary: "Every worker: id, address, labels, GPUs and their health, in-flight requests, assignment.",
            body: None,
            response: "crossfade.v1.ListWorkersResponse",
            status: "200",
            query: &[("endpoint", "string", "Only workers eligible for this endpoint.")],
        },
        Operation {
            method: "post",
            path: "/v1/workers",
            id: "add_worker",
            summary: "Add an agent by its control address.",
            body: Some(Body::Message("crossfade.v1.AddWorkerRequest", &[])),
            response: "crossfade.v1.Worker",
            status: "200",
            query: &[],
        },
        Operation {
            method: "delete",
            path: "/v1/workers/{id}",
            id: "remove_worker",
            summary: "Remove a worker (by id or control address).",
            body: None,
            response: "crossfade.v1.RemoveWorkerResponse",
            status: "200",
            query: &[],
        },
        Operation {
            method: "post",
            path: "/v1/workers/{id}/cordon",
            id: "cordon_worker",
            summary: "Keep a worker out of new assignments.",
            body: Some(Body::Message("crossfade.v1.CordonWorkerRequest", &["worker_id"])),
            response: "crossfade.v1.Worker",
            status: "200",
            query: &[],
        },
        Operation {
            method: "post",
            path: "/v1/workers/{id}/uncordon",
            id: "uncordon_worker",
            summary: "Return a cordoned worker to service.",
            body: None,
            response: "crossfade.v1.Worker",
            status: "200",
            query: &[],
        },
        Operation {
            method: "get",
            path: "/v1/routers",
            id: "list_routers",
            summary: "Every router, with the table version it acknowledged.",
            body: None,
            response: "crossfade.v1.ListRoutersResponse",
            status: "200",
            query: &[],
        },
        Operation {
            method: "post",
            path: "/v1/routers",
            id: "add_router",
            summary: "Add a router by its control address.",
            body: Some(Body::Message("crossfade.v1.AddRouterRequest", &[])),
            response: "crossfade.v1.Router",
            status: "200",
            query: &[],
        },
        Operation {
            method: "delete",
            path: "/v1/routers/{address}",
            id: "remove_router",
            summary: "Stop pushing tables to a router.",
            body: None,
            response: "crossfade.v1.RemoveRouterResponse",
            status: "200",
            query: &[],
        },
    ]);
    ops
}

/// The schema's name for a message (`Endpoint`).
fn short(full: &str) -> &str {
    full.rsplit('.').next().unwrap_or(full)
}

fn reference(full: &str) -> Json {
    json!({ "$ref": format!("#/components/schemas/{}", short(full)) })
}

fn scalar(kind: &Kind) -> Json {
    match kind {
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "format": "byte" }),
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32" })
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({ "type": "integer", "format": "int64", "minimum": 0, "maximum": 4_294_967_295_u64 })
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({ "type": "integer", "format": "int64" })
        }
        Kind::Uint64 | Kind::Fixed64 => json!({ "type": "integer", "minimum": 0 }),
        Kind::Enum(e) => {
            let names: Vec<Json> = e
                .values()
                .map(|v| {
                    let name = v.name();
                    let short = ENUM_PREFIXES
                        .iter()
                        .find_map(|p| name.strip_prefix(p))
                        .unwrap_or(name);
                    Json::String(short.to_owned())
                })
                .collect();
            json!({ "type": "string", "enum": names })
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
            "google.protobuf.Duration" => {
                json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$" })
            }
            other => reference(other),
        },
    }
}

fn field_schema(field: &FieldDescriptor) -> Json {
    let mut schema = if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return json!({ "type": "object" });
        };
        json!({ "type": "object", "additionalProperties": scalar(&entry.map_entry_value_field().kind()) })
    } else if field.is_list() {
        json!({ "type": "array", "items": scalar(&field.kind()) })
    } else {
        scalar(&field.kind())
    };
    if let (Some(text), Json::Object(object)) = (comment_of(field), &mut schema) {
        if object.contains_key("$ref") {
            // OpenAPI 3.0 ignores siblings of `$ref`: wrap it.
            let inner = std::mem::take(object);
            object.insert("allOf".into(), json!([Json::Object(inner)]));
        }
        object.insert("description".into(), Json::String(text));
    }
    schema
}

/// A field's leading comment in the `.proto` file.
fn comment_of(field: &FieldDescriptor) -> Option<String> {
    let file = field.parent_file();
    let location = file.file_descriptor_proto().source_code_info.as_ref()?;
    let path = field.path();
    location
        .location
        .iter()
        .find(|l| l.path == path)
        .and_then(|l| l.leading_comments.as_deref())
        .map(|c| c.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|c| !c.is_empty())
}

/// The schema of `message`, its fields minus `omit`; messages it names are
/// added to `schemas`.
fn message_schema(
    message: &MessageDescriptor,
    omit: &[&str],
    schemas: &mut BTreeMap<String, Json>,
) -> Json {
    let mut properties = Map::new();
    for field in message.fields() {
        if omit.contains(&field.name()) {
            continue;
        }
        properties.insert(field.name().to_owned(), field_schema(&field));
        let value_kind = match field.kind() {
            Kind::Message(m) if m.is_map_entry() => m.map_entry_value_field().kind(),
            other => other,
        };
        if let Kind::Message(m) = value_kind
            && !m.full_name().starts_with("google.protobuf.")
        {
            add(&m, schemas);
        }
    }
    if [
        "crossfade.v1.PromotionSettings",
        "crossfade.v1.PromotionSettingsUpdate",
    ]
    .contains(&message.full_name())
    {
        let mut nested = Map::new();
        for key in ROLLING_DEPLOY_CONFIG {
            if let Some(schema) = properties.remove(*key) {
                nested.insert((*key).to_owned(), schema);
            }
        }
        properties.insert(
            "rolling_deploy_config".into(),
            json!({
                "type": "object",
                "description": "Baseten's rolling_deploy_config: how each step moves.",
                "properties": nested,
                "additionalProperties": false,
            }),
        );
    }
    json!({ "type": "object", "properties": properties, "additionalProperties": false })
}

fn add(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Json>) {
    let name = short(message.full_name()).to_owned();
    if schemas.contains_key(&name) {
        return;
    }
    // A placeholder first: messages may refer to each other.
    schemas.insert(name.clone(), Json::Null);
    let schema = message_schema(message, &[], schemas);
    schemas.insert(name, schema);
}

fn message(name: &str) -> MessageDescriptor {
    pool()
        .get_message_by_name(name)
        .unwrap_or_else(|| panic!("{name} is in crossfade's descriptors"))
}

/// The OpenAPI document.
pub fn document() -> Json {
    let mut schemas: BTreeMap<String, Json> = BTreeMap::new();
    let mut paths: BTreeMap<&str, Map<String, Json>> = BTreeMap::new();
    let error = json!({
        "description": "An error: the HTTP status of its gRPC code (400 INVALID_ARGUMENT, 404 NOT_FOUND, 409 FAILED_PRECONDITION, 503 UNAVAILABLE from a standby, which names the leader in `x-crossfade-leader`, ...).",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    });
    for op in operations() {
        let mut parameters: Vec<Json> = op
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| {
                // The examples name what `tests/tests/rest.rs` creates, so
                // that schemathesis reaches past "not found".
                let example = if name == "name" { "chat" } else { "127.0.0.1:9" };
                json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" }, "example": example })
            })
            .collect();
        for (name, kind, description) in op.query {
            let schema = match *kind {
                "uint32" => {
                    json!({ "type": "integer", "minimum": 0, "maximum": 4_294_967_295_u64 })
                }
                "bool" => json!({ "type": "boolean" }),
                _ => json!({ "type": "string" }),
            };
            parameters.push(json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema }));
        }
        let mut operation = json!({
            "operationId": op.id,
            "summary": op.summary,
            "parameters": parameters,
            "responses": {
                op.status: {
                    "description": "OK",
                    "content": { "application/json": { "schema": reference(op.response) } }
                },
                "default": error.clone(),
            }
        });
        add(&message(op.response), &mut schemas);
        let body = match &op.body {
            None => None,
            Some(Body::Message(name, omit)) => {
                let descriptor = message(name);
                if omit.is_empty() {
                    add(&descriptor, &mut schemas);
                    Some(reference(name))
                } else {
                    Some(message_schema(&descriptor, omit, &mut schemas))
                }
            }
            Some(Body::Patch) => {
                for name in [
                    "crossfade.v1.PromotionSettingsUpdate",
                    "crossfade.v1.ScalingUpdate",
                    "crossfade.v1.WorkerSelector",
                ] {
                    add(&message(name), &mut schemas);
                }
                Some(json!({
                    "type": "object",
                    "properties": {
                        "promotion_settings": reference("crossfade.v1.PromotionSettingsUpdate"),
                        "scaling": reference("crossfade.v1.ScalingUpdate"),
                        "aliases": { "type": "array", "items": { "type": "string" } },
                        "selector": reference("crossfade.v1.WorkerSelector"),
                    },
                    "additionalProperties": false,
                }))
            }
        };
        if let (Some(schema), Json::Object(object)) = (body, &mut operation) {
            object.insert(
                "requestBody".into(),
                json!({ "required": false, "content": { "application/json": { "schema": schema } } }),
            );
        }
        paths
            .entry(op.path)
            .or_default()
            .insert(op.method.to_owned(), operation);
    }
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": { "type": "string", "description": "The gRPC status name: NOT_FOUND, INVALID_ARGUMENT, ..." },
                        "message": { "type": "string", "description": "What went wrong, naming the field and its range." }
                    }
                }
            }
        }),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "crossfade coordinator REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The Coordinator gRPC API as JSON over HTTP, with Baseten's names where Baseten has them. Served on the coordinator's `[listen] http` (loopback only). Generated from proto/crossfade/v1 by crossfade-coordinator's rest::openapi."
        },
        "paths": paths,
        "components": { "schemas": schemas },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `docs/openapi.json` is what the generator writes, so it says what
    /// the server sends.
    #[test]
    fn the_committed_openapi_file_is_the_generated_one() {
        let generated = format!("{}\n", serde_json::to_string_pretty(&document()).unwrap());
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        if std::env::var_os("CROSSFADE_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        assert!(
            super::super::OPENAPI_JSON == generated,
            "docs/openapi.json is stale: run CROSSFADE_WRITE_OPENAPI=1 cargo test -p crossfade-coordinator openapi"
        );
    }

    #[test]
    fn settings_are_in_baseten_shape_and_every_reference_resolves() {
        let doc = document();
        let settings = &doc["components"]["schemas"]["PromotionSettings"]["properties"];
        assert!(settings["rolling_deploy_config"]["properties"]["max_surge_percent"].is_object());
        assert!(settings["max_surge_percent"].is_null());
        let text = doc.to_string();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{name} is referred to and not defined"
            );
        }
        assert!(doc["paths"]["/v1/endpoints/{name}/pause_promotion"]["post"].is_object());
    }
}
