//! A template is checked when it is promoted, not on a worker: a model, a
//! `vllm_args` every agent can launch (it splits, and sets no flag the
//! agent owns), and an environment whose values the coordinator can supply
//! now, from the variables its configuration lets templates read
//! (`template_env`). The check names the field; it never quotes a secret,
//! nor lists what the coordinator's environment holds.

use std::collections::BTreeSet;

use crossfade_common::vllm_args::{self, VllmArgsError};
use crossfade_proto::v1;

use crate::error::CoordinatorError;

/// Sizes a template may have: every deployment is stored, so a caller must
/// not be able to bloat the store.
const MAX_MODEL: usize = 512;
const MAX_IMAGE: usize = 512;
const MAX_VLLM_ARGS: usize = 16 * 1024;
const MAX_ENV: usize = 128;
const MAX_ENV_NAME: usize = 256;
const MAX_ENV_VALUE: usize = 32 * 1024;
const MAX_LABELS: usize = 64;
const MAX_LABEL: usize = 256;

fn too_long(field: impl Into<String>, len: usize, max: usize) -> CoordinatorError {
    CoordinatorError::invalid(field, format!("{len} bytes; at most {max}"))
}

/// The sizes of `template`, each against its bound.
fn check_sizes(template: &v1::Template) -> Result<(), CoordinatorError> {
    for (field, len, max) in [
        ("template.model", template.model.len(), MAX_MODEL),
        ("template.image", template.image.len(), MAX_IMAGE),
        (
            "template.vllm_args",
            template.vllm_args.len(),
            MAX_VLLM_ARGS,
        ),
    ] {
        if len > max {
            return Err(too_long(field, len, max));
        }
    }
    if template.env.len() > MAX_ENV {
        return Err(CoordinatorError::invalid(
            "template.env",
            format!("{} variables; at most {MAX_ENV}", template.env.len()),
        ));
    }
    for (i, var) in template.env.iter().enumerate() {
        if var.name.len() > MAX_ENV_NAME {
            return Err(too_long(
                format!("template.env[{i}].name"),
                var.name.len(),
                MAX_ENV_NAME,
            ));
        }
        let value = match &var.source {
            Some(v1::env_var::Source::Value(v) | v1::env_var::Source::FromCoordinatorEnv(v)) => v,
            None => continue,
        };
        if value.len() > MAX_ENV_VALUE {
            return Err(too_long(
                format!("template.env[{i}]"),
                value.len(),
                MAX_ENV_VALUE,
            ));
        }
    }
    if template.labels.len() > MAX_LABELS {
        return Err(CoordinatorError::invalid(
            "template.labels",
            format!("{} labels; at most {MAX_LABELS}", template.labels.len()),
        ));
    }
    if let Some((key, value)) = template
        .labels
        .iter()
        .find(|(k, v)| k.len() > MAX_LABEL || v.len() > MAX_LABEL)
    {
        let prefix: String = key.chars().take(32).collect();
        return Err(CoordinatorError::invalid(
            "template.labels",
            format!(
                "`{}`: keys and values of at most {MAX_LABEL} bytes ({} and {})",
                prefix.escape_debug(),
                key.len(),
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Checks `template` for promotion; `allowed` names the variables of the
/// coordinator's environment templates may read, and `env` reads it (the
/// process's, outside tests).
pub fn validate(
    template: &v1::Template,
    allowed: &BTreeSet<String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), CoordinatorError> {
    check_sizes(template)?;
    if template.model.trim().is_empty() {
        return Err(CoordinatorError::invalid(
            "template.model",
            "required (MODEL_NAME)",
        ));
    }
    match vllm_args::split(&template.vllm_args) {
        Ok(_) => {}
        // The value itself may hold a credential: only the reason is told.
        Err(VllmArgsError::Unsplittable { reason, .. }) => {
            return Err(CoordinatorError::invalid(
                "template.vllm_args",
                format!("does not split into words as a shell would ({reason})"),
            ));
        }
        Err(VllmArgsError::Owned { flag, why }) => {
            return Err(CoordinatorError::invalid(
                "template.vllm_args",
                format!("may not set {flag}: {why}"),
            ));
        }
    }
    for (i, var) in template.env.iter().enumerate() {
        let field = format!("template.env[{i}]");
        if var.name.is_empty() || var.name.contains('=') || var.name.contains('\0') {
            return Err(CoordinatorError::invalid(
                format!("{field}.name"),
                "must be a non-empty name without `=`",
            ));
        }
        if let Some(why) = crossfade_common::engine_env::owned(&var.name) {
            return Err(CoordinatorError::invalid(
                format!("{field}.name"),
                format!("{} may not be set: {why}", var.name),
            ));
        }
        match &var.source {
            None => {
                return Err(CoordinatorError::invalid(
                    field,
                    format!("{} needs a value or from_coordinator_env", var.name),
                ));
            }
            Some(v1::env_var::Source::FromCoordinatorEnv(name)) if !allowed.contains(name) => {
                return Err(CoordinatorError::invalid(
                    format!("{field}.from_coordinator_env"),
                    format!(
                        "{name} (for {}) is not a variable templates may read: list it in the coordinator's `template_env`",
                        var.name
                    ),
                ));
            }
            Some(v1::env_var::Source::FromCoordinatorEnv(name)) if env(name).is_none() => {
                return Err(CoordinatorError::invalid(
                    format!("{field}.from_coordinator_env"),
                    format!(
                        "environment variable {name} (for {}) is not set on the coordinator",
                        var.name
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Resolves `from_coordinator_env` variables from `env`, for an `Apply`,
/// reading only the `allowed` ones; the values never appear in an error.
pub fn resolve(
    mut template: v1::Template,
    allowed: &BTreeSet<String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<v1::Template, String> {
    for var in &mut template.env {
        if let Some(v1::env_var::Source::FromCoordinatorEnv(name)) = &var.source {
            if !allowed.contains(name) {
                return Err(format!(
                    "{name} (for {}) is not a variable templates may read",
                    var.name
                ));
            }
            let value = env(name).ok_or_else(|| {
                format!(
                    "environment variable {name} (for {}) is not set on the coordinator",
                    var.name
                )
            })?;
            var.source = Some(v1::env_var::Source::Value(value));
        }
    }
    Ok(template)
}

/// The coordinator's own environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn template(vllm_args: &str) -> v1::Template {
        v1::Template {
            model: "Qwen/Qwen3-8B".into(),
            vllm_args: vllm_args.into(),
            ..Default::default()
        }
    }

    fn from_env(name: &str, variable: &str) -> v1::EnvVar {
        v1::EnvVar {
            name: name.into(),
            source: Some(v1::env_var::Source::FromCoordinatorEnv(variable.into())),
            secret: true,
            redacted: false,
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The variables these tests' coordinator lets templates read.
    fn allowed() -> BTreeSet<String> {
        ["CROSSFADE_TEST_UNSET".to_owned(), "y".to_owned()].into()
    }

    fn message(result: Result<(), CoordinatorError>) -> String {
        tonic::Status::from(result.unwrap_err())
            .message()
            .to_owned()
    }

    #[test]
    fn vllm_args_are_checked_as_the_agent_splits_them() {
        assert!(
            validate(
                &template("--max-model-len 4096 --chat-template '{{ x }}'"),
                &allowed(),
                no_env
            )
            .is_ok()
        );
        assert!(validate(&template("--api-key sk-secret"), &allowed(), no_env).is_ok());
        let text = message(validate(
            &template("--api-key 'sk-secret"),
            &allowed(),
            no_env,
        ));
        assert!(
            text.starts_with("template.vllm_args: does not split"),
            "{text}"
        );
        assert!(!text.contains("sk-secret"), "{text}");
    }

    #[test]
    fn flags_the_agent_owns_are_refused_by_name() {
        for (args, flag) in [
            ("--port 9000", "--port"),
            ("--host=0.0.0.0", "--host"),
            ("--served-model-name x", "--served-model-name"),
            ("--model other", "--model"),
        ] {
            let text = message(validate(&template(args), &allowed(), no_env));
            assert!(
                text.starts_with(&format!("template.vllm_args: may not set {flag}: ")),
                "{text}"
            );
        }
    }

    #[test]
    fn a_variable_the_coordinator_lacks_is_refused_at_promotion() {
        let mut t = template("");
        t.env.push(from_env("HF_TOKEN", "CROSSFADE_TEST_UNSET"));
        let text = message(validate(&t, &allowed(), no_env));
        assert_eq!(
            text,
            "template.env[0].from_coordinator_env: environment variable CROSSFADE_TEST_UNSET (for HF_TOKEN) is not set on the coordinator"
        );
        let set = |name: &str| (name == "CROSSFADE_TEST_UNSET").then(|| "hf_value".to_owned());
        assert!(validate(&t, &allowed(), set).is_ok());
        // A variable the configuration does not list is refused, set or
        // not, and the answer does not tell what the environment holds.
        let mut other = template("");
        other.env.push(from_env("HF_TOKEN", "PATH"));
        let text = message(validate(&other, &allowed(), process_env));
        assert_eq!(
            text,
            "template.env[0].from_coordinator_env: PATH (for HF_TOKEN) is not a variable templates may read: list it in the coordinator's `template_env`"
        );
        assert!(resolve(other, &allowed(), process_env).is_err());
        let resolved = resolve(t, &allowed(), set).unwrap();
        assert_eq!(
            resolved.env[0].source,
            Some(v1::env_var::Source::Value("hf_value".into()))
        );
    }

    #[test]
    fn a_model_and_named_variables_are_required() {
        let mut t = template("");
        t.model = " ".into();
        assert!(message(validate(&t, &allowed(), no_env)).starts_with("template.model: required"));
        let mut t = template("");
        t.env.push(v1::EnvVar {
            name: "A=B".into(),
            ..from_env("x", "y")
        });
        assert!(message(validate(&t, &allowed(), no_env)).starts_with("template.env[0].name: "));
    }

    #[test]
    fn a_template_too_big_to_store_is_refused_by_field_and_bound() {
        let huge = template(&"--x ".repeat(5000));
        assert_eq!(
            message(validate(&huge, &allowed(), no_env)),
            "template.vllm_args: 20000 bytes; at most 16384"
        );
        let mut many = template("");
        for i in 0..129 {
            many.env.push(v1::EnvVar {
                name: format!("V{i}"),
                source: Some(v1::env_var::Source::Value("x".into())),
                ..Default::default()
            });
        }
        assert_eq!(
            message(validate(&many, &allowed(), no_env)),
            "template.env: 129 variables; at most 128"
        );
        let mut big = template("");
        big.env.push(v1::EnvVar {
            name: "BLOB".into(),
            source: Some(v1::env_var::Source::Value("x".repeat(40_000))),
            ..Default::default()
        });
        assert_eq!(
            message(validate(&big, &allowed(), no_env)),
            "template.env[0]: 40000 bytes; at most 32768"
        );
        let mut labeled = template("");
        labeled.labels.insert("k\x1b".repeat(200), "v".into());
        let text = message(validate(&labeled, &allowed(), no_env));
        assert!(text.starts_with("template.labels: `k\\u{1b}k"), "{text}");
        assert!(text.len() < 200, "{text}");
    }

    #[test]
    fn loaders_and_devices_are_refused_at_promotion() {
        for name in ["LD_PRELOAD", "CUDA_VISIBLE_DEVICES", "PATH"] {
            let mut t = template("--served_model_name gpt-4");
            assert!(
                message(validate(&t, &allowed(), no_env))
                    .starts_with("template.vllm_args: may not set --served-model-name: ")
            );
            t.vllm_args.clear();
            t.env.push(v1::EnvVar {
                name: name.into(),
                ..from_env("x", "y")
            });
            let text = message(validate(&t, &allowed(), no_env));
            assert!(
                text.starts_with(&format!("template.env[0].name: {name} may not be set: ")),
                "{text}"
            );
        }
    }
}
