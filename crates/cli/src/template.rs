//! Template files (DESIGN §10): TOML with `runtime`, `model` (MODEL_NAME),
//! `vllm_args` (VLLM_ARGS), `image`, `shutdown_timeout_seconds`, and `[env]`,
//! where a value is a string, or a table with `value` or
//! `from_coordinator_env` and `secret = true`. Without `runtime`, each agent
//! runs the engine its own way (its `[engine] runtime`).
//!
//! ```toml
//! model = "Qwen/Qwen3-8B"
//! vllm_args = "--max-model-len 8192 --enable-prefix-caching"
//! [env]
//! VLLM_LOGGING_LEVEL = "INFO"
//! HF_TOKEN = { from_coordinator_env = "HF_TOKEN", secret = true }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use crossfade_proto::v1;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    runtime: Option<String>,
    model: String,
    #[serde(default)]
    vllm_args: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    shutdown_timeout_seconds: Option<u32>,
    #[serde(default)]
    env: BTreeMap<String, EnvValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EnvValue {
    Plain(String),
    Table(EnvTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvTable {
    value: Option<String>,
    from_coordinator_env: Option<String>,
    #[serde(default)]
    secret: bool,
}

/// Reads a template file.
pub fn load(path: &Path) -> anyhow::Result<v1::Template> {
    let read = || {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the template {}", path.display()))?;
        parse(&text).with_context(|| format!("template {}", path.display()))
    };
    read().map_err(|e| crate::output::BadInput(format!("{e:#}")).into())
}

/// Parses a template.
pub fn parse(text: &str) -> anyhow::Result<v1::Template> {
    let file: File = toml::from_str(text)?;
    let runtime = match file.runtime.as_deref() {
        None => v1::EngineRuntime::Unspecified,
        Some("process") => v1::EngineRuntime::Process,
        Some("container") => v1::EngineRuntime::Container,
        Some(other) => anyhow::bail!("runtime: `{other}` is not `process` or `container`"),
    };
    let mut env = Vec::new();
    for (name, value) in file.env {
        let (source, secret) = match value {
            EnvValue::Plain(value) => (v1::env_var::Source::Value(value), false),
            EnvValue::Table(EnvTable {
                value: Some(value),
                from_coordinator_env: None,
                secret,
            }) => (v1::env_var::Source::Value(value), secret),
            EnvValue::Table(EnvTable {
                value: None,
                from_coordinator_env: Some(variable),
                secret,
            }) => (v1::env_var::Source::FromCoordinatorEnv(variable), secret),
            EnvValue::Table(_) => {
                anyhow::bail!("env.{name}: give exactly one of `value` and `from_coordinator_env`")
            }
        };
        env.push(v1::EnvVar {
            name,
            source: Some(source),
            secret,
            redacted: false,
        });
    }
    Ok(v1::Template {
        runtime: runtime as i32,
        image: file.image,
        model: file.model,
        vllm_args: file.vllm_args,
        env,
        shutdown_timeout_seconds: file.shutdown_timeout_seconds,
        labels: Default::default(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_template_with_plain_and_secret_variables() {
        let template = parse(
            r#"
model = "Qwen/Qwen3-8B"
vllm_args = "--max-model-len 8192"
[env]
LEVEL = "INFO"
HF_TOKEN = { from_coordinator_env = "HF_TOKEN", secret = true }
"#,
        )
        .unwrap();
        assert_eq!(template.model, "Qwen/Qwen3-8B");
        // No `runtime`: the agents' own, so one file serves both kinds.
        assert_eq!(template.runtime, v1::EngineRuntime::Unspecified as i32);
        assert_eq!(template.env.len(), 2);
        let token = template.env.iter().find(|v| v.name == "HF_TOKEN").unwrap();
        assert!(token.secret);
        assert_eq!(
            token.source,
            Some(v1::env_var::Source::FromCoordinatorEnv("HF_TOKEN".into()))
        );
    }

    #[test]
    fn the_shipped_container_template_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/config/template-container.toml");
        let template = load(&path).unwrap();
        assert_eq!(template.runtime, v1::EngineRuntime::Container as i32);
        assert!(template.image.starts_with("vllm/vllm-openai:"));
    }

    #[test]
    fn mistakes_are_named() {
        let error = parse("model = \"m\"\nruntime = \"vm\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("runtime: `vm`"), "{error}");
        let error = parse("modle = \"m\"\n").unwrap_err().to_string();
        assert!(error.contains("modle"), "{error}");
    }
}
