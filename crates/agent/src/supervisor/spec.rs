//! What a spec becomes on this host: the launch plan (command line,
//! environment, log), with its secrets kept out of the process list, and
//! those secrets masked wherever the engine's output leaves the agent.

use super::*;

/// Builds the launch plan of `spec`, or says which field is wrong.
pub fn plan(
    settings: &config::Engine,
    spec: &v1::EngineSpec,
    log_path: PathBuf,
) -> Result<LaunchPlan, SupervisorError> {
    let invalid = |message: String| Err(SupervisorError::Invalid(message));
    if spec.deployment_id.trim().is_empty() {
        return invalid("spec.deployment_id: required".into());
    }
    if spec.endpoint.trim().is_empty() {
        return invalid("spec.endpoint: required (the name the engine serves)".into());
    }
    let Some(template) = &spec.template else {
        return invalid("spec.template: required".into());
    };
    let containers = settings.runtime == config::RuntimeKind::Container;
    match v1::EngineRuntime::try_from(template.runtime) {
        Ok(v1::EngineRuntime::Unspecified) => {}
        Ok(v1::EngineRuntime::Process) if containers => {
            return Err(SupervisorError::Precondition(
                "spec.template.runtime: this agent runs engines as containers (engine.runtime = \"container\"), not as processes".into(),
            ));
        }
        Ok(v1::EngineRuntime::Container) if !containers => {
            return Err(SupervisorError::Precondition(
                "spec.template.runtime: this agent runs engines as processes (engine.runtime = \"process\"), not as containers".into(),
            ));
        }
        Ok(v1::EngineRuntime::Process | v1::EngineRuntime::Container) => {}
        Err(_) => {
            return invalid(format!(
                "spec.template.runtime: unknown value {}",
                template.runtime
            ));
        }
    }
    let args = engine_args(&Launch {
        model: &template.model,
        endpoint: &spec.endpoint,
        aliases: &spec.aliases,
        vllm_args: &template.vllm_args,
        // In a container, the engine listens on the container's own
        // network, published on the host's loopback only.
        host: if containers { "0.0.0.0" } else { "127.0.0.1" },
        port: settings.port,
        shutdown_timeout_seconds: template.shutdown_timeout_seconds,
    })
    .map_err(|e| SupervisorError::Invalid(format!("spec.template: {e}")))?;
    let mut env = Vec::with_capacity(template.env.len() + 3);
    // Secrets the engine also reads from its environment leave its command
    // line, which every user of the host can read (`ps`).
    let args = secrets_to_env(args, &mut env);
    if !settings.cuda_visible_devices.is_empty() {
        env.push((
            "CUDA_VISIBLE_DEVICES".to_owned(),
            settings.cuda_visible_devices.clone(),
        ));
    }
    for (i, var) in template.env.iter().enumerate() {
        if var.name.is_empty() || var.name.contains(['=', '\0']) {
            return invalid(format!(
                "spec.template.env[{i}].name: must be a non-empty name without `=` or NUL"
            ));
        }
        if let Some(why) = crossfade_common::engine_env::owned(&var.name) {
            return invalid(format!(
                "spec.template.env[{i}].name: {} may not be set: {why}",
                var.name
            ));
        }
        match &var.source {
            Some(v1::env_var::Source::Value(value)) if !value.contains('\0') => {
                env.push((var.name.clone(), value.clone()));
            }
            Some(v1::env_var::Source::Value(_)) => {
                return invalid(format!(
                    "spec.template.env[{i}] ({}): the value may not contain NUL",
                    var.name
                ));
            }
            Some(v1::env_var::Source::FromCoordinatorEnv(_)) | None => {
                return invalid(format!(
                    "spec.template.env[{i}] ({}): needs a value; the coordinator resolves `from_coordinator_env` before it sends a spec",
                    var.name
                ));
            }
        }
    }
    Ok(LaunchPlan {
        program: settings.command.clone(),
        args,
        env,
        log_path,
        port: settings.port,
        image: template.image.clone(),
        labels: vec![
            (
                super::container::LABEL_DEPLOYMENT.to_owned(),
                spec.deployment_id.clone(),
            ),
            (
                super::container::LABEL_SPEC_HASH.to_owned(),
                format!("{:016x}", fnv1a(&prost::Message::encode_to_vec(spec))),
            ),
        ],
        gpus: settings.cuda_visible_devices.clone(),
    })
}

/// FNV-1a, 64 bits: a stable hash of a spec for a label (not a secret's
/// digest: the spec's secrets are not in it).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Secret flags vLLM also reads from its environment, and those variables.
const SECRET_FLAG_ENV: &[(&str, &str)] =
    &[("--api-key", "VLLM_API_KEY"), ("--hf-token", "HF_TOKEN")];

/// Moves the values of [`SECRET_FLAG_ENV`] flags (one value each, in any
/// spelling) from `args` to `env`.
fn secrets_to_env(args: Vec<String>, env: &mut Vec<(String, String)>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut words = args.into_iter().peekable();
    while let Some(word) = words.next() {
        let Some((_, var)) = SECRET_FLAG_ENV
            .iter()
            .find(|(flag, _)| crossfade_common::vllm_args::names(&word, flag))
        else {
            out.push(word);
            continue;
        };
        let value = match word.split_once('=') {
            Some((_, value)) => Some(value.to_owned()),
            None => words.next_if(|next| !next.starts_with("--")),
        };
        match value {
            Some(value) => env.push(((*var).to_owned(), value)),
            // No value: vLLM reports it, as it would.
            None => out.push(word),
        }
    }
    out
}

/// The secret values of `spec`: its secret environment variables and the
/// values of secret flags in its `vllm_args` (`--api-key`, ...).
pub(super) fn secret_values(spec: &v1::EngineSpec) -> Vec<String> {
    let Some(template) = &spec.template else {
        return Vec::new();
    };
    let mut secrets: Vec<String> = template
        .env
        .iter()
        .filter(|var| var.secret)
        .filter_map(|var| match &var.source {
            Some(v1::env_var::Source::Value(value)) => Some(value.clone()),
            _ => None,
        })
        .collect();
    if let Ok(words) = crossfade_common::vllm_args::split(&template.vllm_args) {
        for flag in crossfade_common::vllm_args::SECRET_FLAGS {
            if let Some(value) = crossfade_common::vllm_args::value_of(&words, flag) {
                secrets.push(value.to_owned());
            }
        }
    }
    secrets.retain(|s| !s.is_empty());
    // The longest first: a secret that contains another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// The engine log's last `lines`, each secret value masked: what an engine
/// prints (a failing one echoing its environment) leaves the agent only
/// masked, in the status, the failure reason and the agent's own log.
pub(super) fn masked_tail(path: &std::path::Path, lines: usize, secrets: &[String]) -> Vec<String> {
    log_tail(path, lines)
        .into_iter()
        .map(|line| {
            secrets.iter().fold(line, |line, secret| {
                line.replace(secret.as_str(), crossfade_common::vllm_args::REDACTED)
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(env: Vec<v1::EnvVar>) -> v1::EngineSpec {
        v1::EngineSpec {
            deployment_id: "dep-1".into(),
            endpoint: "chat".into(),
            aliases: vec!["qwen".into()],
            template: Some(v1::Template {
                runtime: v1::EngineRuntime::Process as i32,
                model: "Qwen/Qwen3-8B".into(),
                vllm_args: "--max-model-len 4096".into(),
                env,
                shutdown_timeout_seconds: Some(30),
                ..Default::default()
            }),
            ready_timeout: None,
        }
    }

    fn var(name: &str, source: v1::env_var::Source, secret: bool) -> v1::EnvVar {
        v1::EnvVar {
            name: name.into(),
            source: Some(source),
            secret,
            redacted: false,
        }
    }

    #[test]
    fn the_plan_carries_the_environment_and_the_gpus_and_prints_no_secret() {
        let settings = config::Engine {
            command: "fake-vllm".into(),
            cuda_visible_devices: "0,1".into(),
            ..config::Engine::default()
        };
        let spec = spec(vec![var(
            "HF_TOKEN",
            v1::env_var::Source::Value("hf_abcdef".into()),
            true,
        )]);
        let plan = plan(&settings, &spec, "engine.log".into()).unwrap();
        assert_eq!(plan.program, "fake-vllm");
        assert_eq!(
            plan.env,
            [
                ("CUDA_VISIBLE_DEVICES".to_owned(), "0,1".to_owned()),
                ("HF_TOKEN".to_owned(), "hf_abcdef".to_owned())
            ]
        );
        assert!(
            plan.args
                .windows(2)
                .any(|w| w == ["--shutdown-timeout", "30"])
        );
        assert!(!format!("{plan:?}").contains("hf_abcdef"));
    }

    #[test]
    fn secret_flags_leave_the_command_line_for_the_environment() {
        let settings = config::Engine::default();
        let mut keyed = spec(Vec::new());
        if let Some(t) = keyed.template.as_mut() {
            t.vllm_args = "--api-key sk-abc --max-model-len 4096 --hf_token=hf_x".into();
        }
        let plan = plan(&settings, &keyed, "l".into()).unwrap();
        assert!(
            !plan
                .args
                .iter()
                .any(|a| a.contains("sk-abc") || a.contains("hf_x")),
            "{:?}",
            plan.args
        );
        assert!(plan.args.iter().any(|a| a == "--max-model-len"));
        assert!(
            plan.env
                .contains(&("VLLM_API_KEY".to_owned(), "sk-abc".to_owned()))
        );
        assert!(
            plan.env
                .contains(&("HF_TOKEN".to_owned(), "hf_x".to_owned()))
        );
    }

    #[test]
    fn secrets_of_the_spec_are_masked_in_the_engine_log_tail() {
        let mut secret_spec = spec(vec![
            var(
                "HF_TOKEN",
                v1::env_var::Source::Value("hf_s3cr3t".into()),
                true,
            ),
            var(
                "LOG_LEVEL",
                v1::env_var::Source::Value("INFO".into()),
                false,
            ),
        ]);
        if let Some(t) = secret_spec.template.as_mut() {
            t.vllm_args = "--api_key sk-abc123 --max-model-len 4096".into();
        }
        let dir = std::env::temp_dir().join(format!("crossfade-mask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("engine.log");
        std::fs::write(
            &log,
            "HF_TOKEN=hf_s3cr3t LOG_LEVEL=INFO\nOSError: bad key sk-abc123\n",
        )
        .unwrap();
        let tail = masked_tail(&log, 5, &secret_values(&secret_spec));
        assert_eq!(
            tail,
            [
                "HF_TOKEN=<redacted> LOG_LEVEL=INFO",
                "OSError: bad key <redacted>"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_spec_names_its_field() {
        let settings = config::Engine::default();
        let error =
            |spec: &v1::EngineSpec| plan(&settings, spec, "l".into()).unwrap_err().to_string();
        let mut no_id = spec(Vec::new());
        no_id.deployment_id.clear();
        assert_eq!(error(&no_id), "spec.deployment_id: required");
        let unresolved = spec(vec![var(
            "HF_TOKEN",
            v1::env_var::Source::FromCoordinatorEnv("HF_TOKEN".into()),
            true,
        )]);
        assert!(error(&unresolved).starts_with("spec.template.env[0] (HF_TOKEN): needs a value"));
        let unnamed = spec(vec![var(
            "A=B",
            v1::env_var::Source::Value("x".into()),
            false,
        )]);
        assert!(error(&unnamed).starts_with("spec.template.env[0].name: "));
        for owned in ["LD_PRELOAD", "CUDA_VISIBLE_DEVICES", "PYTHONPATH"] {
            let hijack = spec(vec![var(
                owned,
                v1::env_var::Source::Value("/tmp/evil.so".into()),
                false,
            )]);
            assert!(
                error(&hijack).starts_with(&format!(
                    "spec.template.env[0].name: {owned} may not be set: "
                )),
                "{}",
                error(&hijack)
            );
        }
        let mut quoted = spec(Vec::new());
        if let Some(t) = quoted.template.as_mut() {
            t.vllm_args = "--chat-template '{{ x }}".into();
        }
        assert!(error(&quoted).starts_with("spec.template: VLLM_ARGS does not split"));
        let mut container = spec(Vec::new());
        if let Some(t) = container.template.as_mut() {
            t.runtime = v1::EngineRuntime::Container as i32;
        }
        assert!(matches!(
            plan(&settings, &container, "l".into()),
            Err(SupervisorError::Precondition(_))
        ));
    }
}
