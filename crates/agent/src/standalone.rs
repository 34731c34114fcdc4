//! Standalone mode: with no coordinator, the agent runs the deployment its
//! environment describes, the convention of Vast.ai's vLLM template:
//! `MODEL_NAME` (the model to load), `VLLM_ARGS` (more vLLM flags, split as
//! a shell splits words) and `SERVED_MODEL_NAME` (the name clients send;
//! the model's name when unset).

use crossfade_proto::v1;

/// The deployment of the environment, `None` without `MODEL_NAME`.
///
/// Its id is derived from the three values, so a restarted agent with the
/// same environment recognises (and adopts) the engine it started.
pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Option<v1::EngineSpec> {
    let model = env("MODEL_NAME").filter(|m| !m.trim().is_empty())?;
    let vllm_args = env("VLLM_ARGS").unwrap_or_default();
    let served = env("SERVED_MODEL_NAME")
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| model.clone());
    let id = format!(
        "standalone-{:016x}",
        fnv1a(&[model.as_bytes(), vllm_args.as_bytes(), served.as_bytes()])
    );
    Some(v1::EngineSpec {
        deployment_id: id,
        endpoint: served,
        aliases: Vec::new(),
        template: Some(v1::Template {
            runtime: v1::EngineRuntime::Process as i32,
            model,
            vllm_args,
            ..Default::default()
        }),
        ready_timeout: None,
    })
}

/// FNV-1a over the parts, each followed by a separator byte.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_environment_names_the_deployment() {
        assert_eq!(
            from_env(env(&[("VLLM_ARGS", "--max-model-len 4096")])),
            None
        );
        let spec = from_env(env(&[
            ("MODEL_NAME", "org/m"),
            ("VLLM_ARGS", "--max-model-len 4096"),
        ]))
        .unwrap();
        assert_eq!(spec.endpoint, "org/m");
        let template = spec.template.as_ref().unwrap();
        assert_eq!(template.model, "org/m");
        assert_eq!(template.vllm_args, "--max-model-len 4096");
        let named = from_env(env(&[
            ("MODEL_NAME", "org/m"),
            ("VLLM_ARGS", "--max-model-len 4096"),
            ("SERVED_MODEL_NAME", "chat"),
        ]))
        .unwrap();
        assert_eq!(named.endpoint, "chat");
        assert_ne!(named.deployment_id, spec.deployment_id);
        let again = from_env(env(&[
            ("MODEL_NAME", "org/m"),
            ("VLLM_ARGS", "--max-model-len 4096"),
            ("SERVED_MODEL_NAME", "chat"),
        ]))
        .unwrap();
        assert_eq!(
            again.deployment_id, named.deployment_id,
            "stable across restarts"
        );
        assert!(named.deployment_id.starts_with("standalone-"));
    }
}
