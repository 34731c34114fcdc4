//! `VLLM_ARGS`, as the agent turns it into the engine's arguments and as the
//! coordinator checks it when a template is promoted: split the way a POSIX
//! shell splits words, without the flags the agent sets itself. One
//! definition, so a template the coordinator accepts is one every agent can
//! launch.

/// Flags the agent sets itself; `VLLM_ARGS` may not, and the error says why.
pub const OWNED_FLAGS: &[(&str, &str)] = &[
    (
        "--served-model-name",
        "the agent serves the endpoint's name (SERVED_MODEL_NAME when standalone), its aliases and the model's name; \
         set aliases on the endpoint instead",
    ),
    (
        "--host",
        "the engine listens on 127.0.0.1 behind the agent's gate",
    ),
    (
        "--port",
        "the agent picks the engine's port ([engine] port)",
    ),
    (
        "--model",
        "the model is the template's `model` (MODEL_NAME)",
    ),
];

/// vLLM flags whose value is a credential: never logged, stored in the
/// clear only where the engine needs it, redacted in every output.
pub const SECRET_FLAGS: &[&str] = &["--api-key", "--hf-token", "--ssl-keyfile-password"];

/// The value that stands for a secret in every output.
pub const REDACTED: &str = "<redacted>";

/// Why `VLLM_ARGS` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VllmArgsError {
    /// It does not split (an unbalanced quote, a trailing backslash).
    #[error("VLLM_ARGS does not split into words as a shell would ({reason}): {vllm_args}")]
    Unsplittable {
        /// The splitter's reason.
        reason: String,
        /// The value, to find the quote in.
        vllm_args: String,
    },
    /// It sets a flag the agent owns.
    #[error("VLLM_ARGS may not set {flag}: {why}")]
    Owned {
        /// The flag.
        flag: &'static str,
        /// Why the agent owns it.
        why: &'static str,
    },
}

/// The words of `VLLM_ARGS`; refuses a string that does not split and a
/// flag the agent owns in every spelling vLLM's parser (argparse) reads as
/// that flag: `--port 1`, `--port=1`, `--served_model_name`, `--serv`.
pub fn split(vllm_args: &str) -> Result<Vec<String>, VllmArgsError> {
    let words = shell_words::split(vllm_args).map_err(|e| VllmArgsError::Unsplittable {
        reason: e.to_string(),
        vllm_args: vllm_args.to_owned(),
    })?;
    for word in &words {
        if let Some((flag, why)) = OWNED_FLAGS.iter().find(|(owned, _)| names(word, owned)) {
            return Err(VllmArgsError::Owned { flag, why });
        }
    }
    Ok(words)
}

/// Whether argparse reads `word` as `flag` (`--flag-name`): the flag, with
/// `_` for `-` (vLLM accepts both), alone or as `--flag=value`, or an
/// abbreviation of it (argparse accepts a prefix of two characters or
/// more). A word of its own that only looks like a flag (`--port` as some
/// flag's value) is read as one too: the safe side.
pub fn names(word: &str, flag: &str) -> bool {
    let (Some(word), Some(flag)) = (word.strip_prefix("--"), flag.strip_prefix("--")) else {
        return false;
    };
    let name = word.split_once('=').map_or(word, |(name, _)| name);
    let name = name.replace('_', "-");
    name == flag || (name.len() >= 2 && flag.starts_with(name.as_str()))
}

/// The value given to `flag` in `words` (`--flag v` or `--flag=v`, in any
/// spelling [`names`] accepts).
pub fn value_of<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words.iter().enumerate().find_map(|(i, word)| {
        if !names(word, flag) {
            None
        } else if let Some((_, value)) = word.split_once('=') {
            Some(value)
        } else {
            words.get(i + 1).map(String::as_str)
        }
    })
}

/// `words` with the value of every [`SECRET_FLAGS`] flag replaced by
/// [`REDACTED`], in either spelling.
pub fn redact_words(words: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(words.len());
    let mut hide_next = false;
    for word in words {
        let secret = SECRET_FLAGS.iter().any(|flag| names(word, flag));
        if std::mem::take(&mut hide_next) {
            out.push(REDACTED.to_owned());
        } else if let (true, Some((flag, _))) = (secret, word.split_once('=')) {
            out.push(format!("{flag}={REDACTED}"));
        } else {
            hide_next = secret;
            out.push(word.clone());
        }
    }
    out
}

/// `VLLM_ARGS` with its secret values redacted, for output; a string that
/// does not split is withheld whole (where its secret ends is unknown).
pub fn redact(vllm_args: &str) -> String {
    match shell_words::split(vllm_args) {
        Ok(words) => shell_words::join(redact_words(&words)),
        Err(_) => REDACTED.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn owned_flags_are_refused_in_either_spelling() {
        for (args, flag) in [
            ("--served-model-name gpt-4", "--served-model-name"),
            ("--port=9000", "--port"),
            ("--host 0.0.0.0", "--host"),
            ("--max-model-len 4096 --model other/model", "--model"),
        ] {
            match split(args).unwrap_err() {
                VllmArgsError::Owned { flag: f, why } => {
                    assert_eq!(f, flag);
                    assert!(!why.is_empty());
                }
                other => panic!("{args}: {other:?}"),
            }
        }
        // A value that merely mentions a flag is fine.
        assert!(split("--chat-template 'never set --port here'").is_ok());
        assert!(split("--api-key sk-1 --max-model-len 4096").is_ok());
    }

    #[test]
    fn owned_flags_are_refused_in_every_spelling_argparse_reads() {
        for (args, flag) in [
            ("--served_model_name gpt-4", "--served-model-name"),
            ("--served-model", "--served-model-name"),
            ("--serv=x", "--served-model-name"),
            ("--po 9000", "--port"),
            ("--ho=0.0.0.0", "--host"),
            ("--mod other/model", "--model"),
        ] {
            match split(args).unwrap_err() {
                VllmArgsError::Owned { flag: f, .. } => assert_eq!(f, flag, "{args}"),
                other => panic!("{args}: {other:?}"),
            }
        }
        // Other flags that share a beginning are not the agent's.
        for args in [
            "--max-model-len 4096",
            "--model-impl vllm",
            "--port-range x",
            "--hf-token=hf_1",
            "-p 2",
        ] {
            assert!(split(args).is_ok(), "{args}");
        }
    }

    #[test]
    fn a_secret_flag_is_read_and_redacted_in_every_spelling() {
        let words = split("--api_key sk-1 --hf_token=hf_2").unwrap();
        assert_eq!(value_of(&words, "--api-key"), Some("sk-1"));
        assert_eq!(value_of(&words, "--hf-token"), Some("hf_2"));
        assert_eq!(
            redact("--api_key sk-1 --hf_token=hf_2 --api-k sk-3"),
            "--api_key '<redacted>' '--hf_token=<redacted>' --api-k '<redacted>'"
        );
    }

    #[test]
    fn an_unbalanced_quote_is_named() {
        let err = split("--chat-template '{{ oops").unwrap_err();
        assert!(matches!(err, VllmArgsError::Unsplittable { .. }));
        assert!(err.to_string().contains("'{{ oops"), "{err}");
    }

    #[test]
    fn a_flag_value_is_found_in_either_spelling() {
        let words = split("--api-key sk-1 --x=2").unwrap();
        assert_eq!(value_of(&words, "--api-key"), Some("sk-1"));
        assert_eq!(value_of(&words, "--x"), Some("2"));
        assert_eq!(value_of(&words, "--y"), None);
        assert_eq!(value_of(&["--api-keyx=1".to_owned()], "--api-key"), None);
    }

    #[test]
    fn secret_values_are_redacted_in_either_spelling() {
        assert_eq!(
            redact("--api-key sk-1 --hf-token=hf_2 --max-model-len 4096"),
            "--api-key '<redacted>' '--hf-token=<redacted>' --max-model-len 4096"
        );
        assert_eq!(redact("--api-key 'sk-1"), REDACTED);
    }
}
