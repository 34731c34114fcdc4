//! The engine's command line, the same for vLLM and `fake-vllm`:
//!
//! ```text
//! vllm serve MODEL_NAME --host 127.0.0.1 --port P
//!     --served-model-name ENDPOINT ALIASES... MODEL_NAME  [--shutdown-timeout N]  VLLM_ARGS...
//! ```
//!
//! The engine listens on loopback only (the gate is the host's inference
//! port), and serves the endpoint's name, every alias and the model's own
//! name, so a client that still sends an old name keeps working after
//! `MODEL_NAME` changes. `VLLM_ARGS` is split the way a POSIX shell splits
//! words; it may not set what the agent owns.

use crossfade_common::vllm_args::{self, VllmArgsError};

/// What the command line is built from.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The model to load: `MODEL_NAME`.
    pub model: &'a str,
    /// The endpoint's name, served first.
    pub endpoint: &'a str,
    /// The endpoint's aliases, served too.
    pub aliases: &'a [String],
    /// `VLLM_ARGS`, one string.
    pub vllm_args: &'a str,
    /// The address it listens on: loopback for a process, every address of
    /// a container's own network.
    pub host: &'a str,
    /// The port the engine listens on.
    pub port: u16,
    /// `--shutdown-timeout`, unless `VLLM_ARGS` sets it already.
    pub shutdown_timeout_seconds: Option<u32>,
}

/// Why a command line cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// `VLLM_ARGS` does not split, or sets a flag the agent owns.
    #[error(transparent)]
    VllmArgs(#[from] VllmArgsError),
    /// No model to load.
    #[error("MODEL_NAME (the template's `model`) is empty")]
    NoModel,
}

/// The arguments after the program name (`vllm` or `fake-vllm`).
pub fn engine_args(launch: &Launch<'_>) -> Result<Vec<String>, CommandError> {
    if launch.model.trim().is_empty() {
        return Err(CommandError::NoModel);
    }
    let extra = vllm_args::split(launch.vllm_args)?;

    let mut args: Vec<String> = ["serve", launch.model, "--host", launch.host, "--port"]
        .map(str::to_owned)
        .into();
    args.push(launch.port.to_string());
    args.push("--served-model-name".into());
    let names = std::iter::once(launch.endpoint)
        .chain(launch.aliases.iter().map(String::as_str))
        .chain(std::iter::once(launch.model));
    for name in names {
        if !name.is_empty() && !args[7..].iter().any(|n| n == name) {
            args.push(name.to_owned());
        }
    }
    let sets_timeout = extra
        .iter()
        .any(|w| w == "--shutdown-timeout" || w.starts_with("--shutdown-timeout="));
    if let (Some(seconds), false) = (launch.shutdown_timeout_seconds, sets_timeout) {
        args.push("--shutdown-timeout".into());
        args.push(seconds.to_string());
    }
    args.extend(extra);
    Ok(args)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn launch<'a>(vllm_args: &'a str, aliases: &'a [String]) -> Launch<'a> {
        Launch {
            model: "Qwen/Qwen3-8B",
            endpoint: "chat",
            aliases,
            vllm_args,
            host: "127.0.0.1",
            port: 8100,
            shutdown_timeout_seconds: None,
        }
    }

    #[test]
    fn the_command_line_of_the_design() {
        let aliases = ["qwen".to_owned(), "chat".to_owned()];
        let args = engine_args(&launch("--max-model-len 4096 --enforce-eager", &aliases)).unwrap();
        assert_eq!(
            args,
            [
                "serve",
                "Qwen/Qwen3-8B",
                "--host",
                "127.0.0.1",
                "--port",
                "8100",
                "--served-model-name",
                "chat",
                "qwen",
                "Qwen/Qwen3-8B",
                "--max-model-len",
                "4096",
                "--enforce-eager",
            ]
        );
    }

    #[test]
    fn vllm_args_split_as_a_shell_splits_them() {
        let args = engine_args(&launch(
            r#"--chat-template '{{ messages }}' --override-generation-config "{\"temperature\": 0.2}""#,
            &[],
        ))
        .unwrap();
        assert_eq!(
            &args[args.len() - 4..],
            [
                "--chat-template",
                "{{ messages }}",
                "--override-generation-config",
                r#"{"temperature": 0.2}"#,
            ]
        );
    }

    #[test]
    fn unbalanced_quotes_are_a_clear_error() {
        let err = engine_args(&launch("--chat-template '{{ oops", &[])).unwrap_err();
        assert!(matches!(
            err,
            CommandError::VllmArgs(VllmArgsError::Unsplittable { .. })
        ));
        let text = err.to_string();
        assert!(
            text.starts_with("VLLM_ARGS does not split into words"),
            "{text}"
        );
        assert!(text.contains("'{{ oops"), "{text}");
    }

    #[test]
    fn flags_the_agent_owns_are_refused_with_the_reason() {
        for (vllm_args, flag) in [
            ("--served-model-name gpt-4", "--served-model-name"),
            ("--port=9000", "--port"),
            ("--host 0.0.0.0", "--host"),
            ("--model other/model", "--model"),
        ] {
            let err = engine_args(&launch(vllm_args, &[])).unwrap_err();
            match &err {
                CommandError::VllmArgs(VllmArgsError::Owned { flag: f, why }) => {
                    assert_eq!(*f, flag);
                    assert!(!why.is_empty());
                }
                other => panic!("{vllm_args}: {other:?}"),
            }
            assert!(
                err.to_string()
                    .starts_with(&format!("VLLM_ARGS may not set {flag}: "))
            );
        }
        // A value that merely mentions a flag is fine (a word that *is* one is
        // the flag to vLLM's argparse too, so it is refused above).
        assert!(engine_args(&launch("--chat-template 'never set --port here'", &[])).is_ok());
    }

    #[test]
    fn the_shutdown_timeout_is_added_unless_vllm_args_sets_one() {
        let mut l = launch("", &[]);
        l.shutdown_timeout_seconds = Some(30);
        let args = engine_args(&l).unwrap();
        assert_eq!(&args[args.len() - 2..], ["--shutdown-timeout", "30"]);

        l.vllm_args = "--shutdown-timeout=5";
        let args = engine_args(&l).unwrap();
        assert_eq!(
            args.iter()
                .filter(|a| a.starts_with("--shutdown-timeout"))
                .count(),
            1
        );
        assert_eq!(args.last().unwrap(), "--shutdown-timeout=5");
    }

    #[test]
    fn a_model_is_required() {
        let mut l = launch("", &[]);
        l.model = " ";
        assert_eq!(engine_args(&l).unwrap_err(), CommandError::NoModel);
    }

    /// fake-vllm takes the line the agent builds, as vLLM does.
    #[test]
    fn fake_vllm_accepts_the_command_line() {
        let aliases = ["qwen".to_owned()];
        let mut l = launch("--max-model-len 4096 --enforce-eager", &aliases);
        l.shutdown_timeout_seconds = Some(10);
        let args = engine_args(&l).unwrap();
        let config = fake_vllm::Config::from_args(args, |_| None).unwrap();
        assert_eq!(config.model, "Qwen/Qwen3-8B");
        assert_eq!(config.served_model_names, ["chat", "qwen", "Qwen/Qwen3-8B"]);
        assert_eq!(config.port, 8100);
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(
            config.shutdown_timeout,
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(config.max_model_len, 4096);
    }
}
