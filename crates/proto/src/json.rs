//! The messages as JSON, for the CLI's `-o json` and the coordinator's REST
//! API: the protos' snake_case field names, enum values by their short
//! names (`"status": "RAMPING_UP"`, DESIGN §10), 64-bit integers as
//! numbers, fields at their default value left out, timestamps in RFC 3339.
//!
//! [`Shape::Rest`] also writes promotion settings in Baseten's shape: the
//! four rolling-step keys inside `rolling_deploy_config`
//! (`{"rolling_deploy": true, "rolling_deploy_config":
//! {"max_surge_percent": 10, ...}}`), and reads them from there.

use std::sync::OnceLock;

use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    ReflectMessage as _, SerializeOptions,
};
use serde_json::Value as Json;

/// The prefixes of crossfade's enum values, which JSON leaves out.
pub const ENUM_PREFIXES: &[&str] = &[
    "PROMOTION_STATUS_",
    "STEP_PHASE_",
    "DEPLOYMENT_STATE_",
    "ENGINE_STATE_",
    "STARTING_PHASE_",
    "ENGINE_RUNTIME_",
    "GPU_HEALTH_",
    "CLEANUP_STRATEGY_",
    "TABLE_SOURCE_",
];

/// The keys of promotion settings that Baseten nests in
/// `rolling_deploy_config`.
pub const ROLLING_DEPLOY_CONFIG: &[&str] = &[
    "max_surge_percent",
    "max_unavailable_percent",
    "stabilization_time_seconds",
    "replica_overhead_percent",
];

/// The messages whose JSON [`Shape::Rest`] writes in Baseten's shape.
const SETTINGS_MESSAGES: &[&str] = &[
    "crossfade.v1.PromotionSettings",
    "crossfade.v1.PromotionSettingsUpdate",
];

/// How promotion settings are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Flat, as the protos are (the CLI's `-o json`).
    Proto,
    /// Baseten's: the rolling-step keys in `rolling_deploy_config` (the
    /// REST API).
    Rest,
}

/// A message could not be turned into JSON or back.
#[derive(Debug)]
pub struct JsonError(pub String);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonError {}

/// crossfade's descriptors.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set built with this crate decodes")
    })
}

/// The descriptor of the message named `name` (`crossfade.v1.Endpoint`).
pub fn descriptor(name: &str) -> Result<MessageDescriptor, JsonError> {
    pool()
        .get_message_by_name(name)
        .ok_or_else(|| JsonError(format!("no message {name} in the descriptor set")))
}

/// `message` (whose full proto name is `name`) as JSON.
pub fn to_json<M: prost::Message>(
    name: &str,
    message: &M,
    shape: Shape,
) -> Result<Json, JsonError> {
    let dynamic = DynamicMessage::decode(descriptor(name)?, message.encode_to_vec().as_slice())
        .map_err(|e| JsonError(e.to_string()))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false);
    let mut value = dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| JsonError(e.to_string()))?;
    walk(&mut value, &dynamic.descriptor(), Direction::Out, shape);
    Ok(value)
}

/// The message named `name` from JSON: short or full enum names, the
/// protos' or JSON's field names; unknown fields refused, naming them.
pub fn from_json<M: prost::Message + Default>(
    name: &str,
    mut value: Json,
    shape: Shape,
) -> Result<M, JsonError> {
    let descriptor = descriptor(name)?;
    walk(&mut value, &descriptor, Direction::In, shape);
    let dynamic = DynamicMessage::deserialize_with_options(
        descriptor,
        value,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| JsonError(e.to_string()))?;
    dynamic
        .transcode_to::<M>()
        .map_err(|e| JsonError(e.to_string()))
}

/// A gRPC status code by its canonical name (`NOT_FOUND`), as errors in
/// JSON name it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error in the one JSON shape of the CLI's `-o json` and the REST API:
/// `{"error": {"code": "NOT_FOUND", "message": "..."}}`.
pub fn error(code: &str, message: &str) -> Json {
    serde_json::json!({ "error": { "code": code, "message": message } })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Message to JSON: enums shortened, settings nested.
    Out,
    /// JSON to message: enums lengthened, settings flattened.
    In,
}

/// Rewrites `value` (JSON of a `message`) field by field, following the
/// descriptors, so that only enum fields and settings messages change.
fn walk(value: &mut Json, message: &MessageDescriptor, direction: Direction, shape: Shape) {
    let Json::Object(object) = value else {
        return;
    };
    let settings = shape == Shape::Rest && SETTINGS_MESSAGES.contains(&message.full_name());
    if settings
        && direction == Direction::In
        && object
            .get("rolling_deploy_config")
            .is_some_and(Json::is_object)
        && let Some(Json::Object(nested)) = object.remove("rolling_deploy_config")
    {
        // (Not an object: left in place, and refused as unknown below.)
        for (key, inner) in nested {
            // A key Baseten does not nest stays unknown: refused below.
            let key = if ROLLING_DEPLOY_CONFIG.contains(&key.as_str()) {
                key
            } else {
                format!("rolling_deploy_config.{key}")
            };
            object.insert(key, inner);
        }
    }
    for field in message.fields() {
        let key = if object.contains_key(field.name()) {
            field.name().to_owned()
        } else if object.contains_key(field.json_name()) {
            field.json_name().to_owned()
        } else {
            continue;
        };
        if let Some(json) = object.get_mut(&key) {
            each_value(json, &field, &mut |v| rewrite(v, &field, direction, shape));
        }
    }
    if settings && direction == Direction::Out {
        let mut nested = serde_json::Map::new();
        for key in ROLLING_DEPLOY_CONFIG {
            if let Some(inner) = object.remove(*key) {
                nested.insert((*key).to_owned(), inner);
            }
        }
        if !nested.is_empty() {
            object.insert("rolling_deploy_config".to_owned(), Json::Object(nested));
        }
    }
}

/// Calls `f` on each value of `field` in `json`: the one, each item of a
/// list, each value of a map.
fn each_value(json: &mut Json, field: &FieldDescriptor, f: &mut dyn FnMut(&mut Json)) {
    match json {
        Json::Array(items) if field.is_list() => items.iter_mut().for_each(f),
        Json::Object(entries) if field.is_map() => entries.values_mut().for_each(f),
        json => f(json),
    }
}

fn rewrite(json: &mut Json, field: &FieldDescriptor, direction: Direction, shape: Shape) {
    let kind = if field.is_map() {
        match field.kind() {
            Kind::Message(entry) => entry.map_entry_value_field().kind(),
            other => other,
        }
    } else {
        field.kind()
    };
    match kind {
        Kind::Enum(enumeration) => {
            let Json::String(text) = json else {
                return;
            };
            match direction {
                Direction::Out => {
                    if let Some(prefix) = ENUM_PREFIXES.iter().find(|p| text.starts_with(**p)) {
                        *text = text[prefix.len()..].to_owned();
                    }
                }
                Direction::In => {
                    if enumeration.get_value_by_name(text).is_none()
                        && let Some(full) = enumeration.values().find(|v| {
                            ENUM_PREFIXES
                                .iter()
                                .any(|p| v.name().strip_prefix(p) == Some(text.as_str()))
                        })
                    {
                        *text = full.name().to_owned();
                    }
                }
            }
        }
        Kind::Message(inner) => walk(json, &inner, direction, shape),
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::v1;

    #[test]
    fn enums_are_short_and_strings_that_look_like_them_are_left_alone() {
        let endpoint = v1::Endpoint {
            name: "PROMOTION_STATUS_looks_like_an_enum".into(),
            in_progress_promotion: Some(v1::Promotion {
                status: v1::PromotionStatus::Paused as i32,
                step_phase: v1::StepPhase::Draining as i32,
                ..Default::default()
            }),
            active_deployment: Some(v1::Deployment {
                state: v1::DeploymentState::Active as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = to_json("crossfade.v1.Endpoint", &endpoint, Shape::Proto).unwrap();
        assert_eq!(value["name"], "PROMOTION_STATUS_looks_like_an_enum");
        assert_eq!(value["in_progress_promotion"]["status"], "PAUSED");
        assert_eq!(value["in_progress_promotion"]["step_phase"], "DRAINING");
        assert_eq!(value["active_deployment"]["state"], "ACTIVE");
        let back: v1::Endpoint = from_json("crossfade.v1.Endpoint", value, Shape::Proto).unwrap();
        assert_eq!(back, endpoint);
    }

    #[test]
    fn rest_settings_are_in_baseten_shape_both_ways() {
        let settings = v1::PromotionSettings {
            rolling_deploy: true,
            max_surge_percent: 10,
            stabilization_time_seconds: 60,
            promotion_cleanup_strategy: v1::CleanupStrategy::Deactivate as i32,
            ..Default::default()
        };
        let value = to_json("crossfade.v1.PromotionSettings", &settings, Shape::Rest).unwrap();
        assert_eq!(value["rolling_deploy"], true);
        assert_eq!(value["rolling_deploy_config"]["max_surge_percent"], 10);
        assert_eq!(
            value["rolling_deploy_config"]["stabilization_time_seconds"],
            60
        );
        assert_eq!(value["promotion_cleanup_strategy"], "DEACTIVATE");
        assert!(value.get("max_surge_percent").is_none(), "{value}");
        let flat = to_json("crossfade.v1.PromotionSettings", &settings, Shape::Proto).unwrap();
        assert_eq!(flat["max_surge_percent"], 10);

        // Baseten's PATCH body, into the update request.
        let body = serde_json::json!({
            "name": "chat",
            "settings": {
                "rolling_deploy": true,
                "rolling_deploy_config": {"max_surge_percent": 25, "max_unavailable_percent": 0},
                "promotion_cleanup_strategy": "KEEP"
            }
        });
        let request: v1::UpdatePromotionSettingsRequest = from_json(
            "crossfade.v1.UpdatePromotionSettingsRequest",
            body,
            Shape::Rest,
        )
        .unwrap();
        let update = request.settings.unwrap();
        assert_eq!(update.rolling_deploy, Some(true));
        assert_eq!(update.max_surge_percent, Some(25));
        assert_eq!(update.max_unavailable_percent, Some(0));
        assert_eq!(
            update.promotion_cleanup_strategy,
            Some(v1::CleanupStrategy::Keep as i32)
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_by_name() {
        let error = from_json::<v1::PromotionSettingsUpdate>(
            "crossfade.v1.PromotionSettingsUpdate",
            serde_json::json!({"rolling_deploy_config": {"max_surgeon_percent": 1}}),
            Shape::Rest,
        )
        .unwrap_err();
        assert!(error.0.contains("max_surgeon_percent"), "{error}");
        let error = from_json::<v1::PromotionSettingsUpdate>(
            "crossfade.v1.PromotionSettingsUpdate",
            serde_json::json!({"rolling_deploy_config": 5}),
            Shape::Rest,
        )
        .unwrap_err();
        assert!(error.0.contains("rolling_deploy_config"), "{error}");
        let error = from_json::<v1::PromotionSettingsUpdate>(
            "crossfade.v1.PromotionSettingsUpdate",
            serde_json::json!({"max_surge_percent": "ten"}),
            Shape::Proto,
        )
        .unwrap_err();
        assert!(!error.0.is_empty());
    }
}
