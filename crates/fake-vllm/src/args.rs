//! vLLM's command line and fake-vllm's environment knobs, parsed into a
//! [`Config`].
//!
//! Parsed by hand rather than with clap: `vllm serve` takes hundreds of
//! flags, and a supervisor passes whatever its deployment says, so every flag
//! we do not model must be accepted and reported rather than rejected.

use std::time::Duration;

use crate::faults::Fault;

/// Everything a fake vLLM needs to know: vLLM's flags plus the fake's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The MODEL positional (or `--model`): what vLLM would load.
    pub model: String,
    /// `--served-model-name`: the names requests may use; the first is the
    /// metrics label. Never empty once parsed.
    pub served_model_names: Vec<String>,
    pub host: String,
    pub port: u16,
    /// `--max-num-seqs`: requests generating at once; the rest wait.
    pub max_num_seqs: usize,
    /// `--max-model-len`: reported by `/v1/models` and enforced on requests.
    pub max_model_len: u64,
    /// `--shutdown-timeout`: `Some` drains in-flight requests on SIGTERM,
    /// `None` aborts them.
    pub shutdown_timeout: Option<Duration>,
    /// `FAKE_VLLM_LOAD_TIME`: how long the port stays closed at startup.
    pub load_time: Duration,
    /// `FAKE_VLLM_TOKENS_PER_SECOND`: generation pace; `inf` means no pacing.
    pub tokens_per_second: f64,
    /// `FAKE_VLLM_TTFT`: extra delay before the first token.
    pub ttft: Duration,
    /// `FAKE_VLLM_MAX_TOKENS`: reply length when a request does not say.
    pub default_max_tokens: u32,
    /// `FAKE_VLLM_FAULT`.
    pub fault: Fault,
    /// `--api-key`: every `/v1/*` request must carry `Authorization: Bearer
    /// KEY`, as vLLM requires.
    pub api_key: Option<ApiKey>,
    /// vLLM flags accepted but not modelled, one entry per flag
    /// (`"--enforce-eager"`, `"--tensor-parallel-size 2"`).
    pub extra_flags: Vec<String>,
}

/// `--api-key`'s value: it never prints (the startup log, `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8000;
pub const DEFAULT_MAX_NUM_SEQS: usize = 256;
pub const DEFAULT_MAX_MODEL_LEN: u64 = 4096;
pub const DEFAULT_TOKENS_PER_SECOND: f64 = 100.0;
pub const DEFAULT_MAX_TOKENS: u32 = 16;

impl Config {
    /// A config with every default, serving `model` under its own name.
    pub fn new(model: impl Into<String>) -> Self {
        let model = model.into();
        Self {
            served_model_names: vec![model.clone()],
            model,
            // vLLM binds 0.0.0.0 by default; the fake uses loopback because
            // everything that talks to it (tests, the demo) is on 127.0.0.1.
            host: DEFAULT_HOST.to_owned(),
            port: DEFAULT_PORT,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            shutdown_timeout: None,
            load_time: Duration::ZERO,
            tokens_per_second: DEFAULT_TOKENS_PER_SECOND,
            ttft: Duration::ZERO,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            fault: Fault::None,
            api_key: None,
            extra_flags: Vec::new(),
        }
    }

    /// Parses `fake-vllm`'s arguments (without the program name, so starting
    /// with `serve`) and its knobs, read through `env` so that tests never
    /// touch the process environment.
    pub fn from_args(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ArgsError> {
        let mut config = parse_command_line(args.into_iter().collect())?;
        // As vLLM: `--api-key` first, else `VLLM_API_KEY` (which keeps the
        // key out of the process list).
        if config.api_key.is_none() {
            config.api_key = env("VLLM_API_KEY").filter(|k| !k.is_empty()).map(ApiKey);
        }
        apply_knobs(&mut config, env)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants the server relies on; [`Config::from_args`]
    /// already did, this is for configs built in code.
    pub fn validate(&self) -> Result<(), ArgsError> {
        if self.served_model_names.is_empty() {
            return Err(usage("at least one served model name is required"));
        }
        if self.max_num_seqs == 0 {
            return Err(usage("--max-num-seqs must be at least 1"));
        }
        if self.tokens_per_second.is_nan() || self.tokens_per_second <= 0.0 {
            return Err(ArgsError::Knob {
                var: TOKENS_PER_SECOND,
                value: self.tokens_per_second.to_string(),
                expected: "a positive number of tokens per second (or `inf`)",
            });
        }
        if self.default_max_tokens == 0 {
            return Err(ArgsError::Knob {
                var: MAX_TOKENS,
                value: "0".to_owned(),
                expected: "a positive whole number of tokens",
            });
        }
        Ok(())
    }

    /// The time between two generated tokens.
    pub fn token_period(&self) -> Duration {
        if self.tokens_per_second.is_finite() {
            Duration::from_secs_f64(1.0 / self.tokens_per_second)
        } else {
            Duration::ZERO
        }
    }
}

/// Why the command line or a knob was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArgsError {
    /// `--help` / `-h`: not a failure; print [`USAGE`] and exit 0.
    #[error("help requested")]
    HelpRequested,
    #[error("{0}")]
    Usage(String),
    #[error("invalid value `{value}` for {var}: expected {expected}")]
    Knob {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
}

impl ArgsError {
    /// The exit status argparse (and so vLLM) would use.
    pub fn exit_code(&self) -> u8 {
        match self {
            ArgsError::HelpRequested => 0,
            ArgsError::Usage(_) | ArgsError::Knob { .. } => 2,
        }
    }
}

fn usage(message: impl Into<String>) -> ArgsError {
    ArgsError::Usage(message.into())
}

pub const USAGE: &str = "\
usage: fake-vllm serve MODEL [--host HOST] [--port PORT]
                       [--served-model-name NAME [NAME ...]]
                       [--max-num-seqs N] [--max-model-len N]
                       [--shutdown-timeout SECONDS] [any other vLLM flag ...]

A stand-in for `vllm serve`: the OpenAI-compatible HTTP API, /health and
/metrics, with a fake engine that generates deterministic words. Flags it
does not model are accepted and listed at startup.

options:
  --model MODEL            the model, instead of the positional
  --host HOST              default 127.0.0.1 (vLLM's is 0.0.0.0)
  --port PORT              default 8000
  --served-model-name ...  names clients may use; default MODEL
  --max-num-seqs N         requests generating at once (default 256)
  --max-model-len N        context length reported and enforced (default 4096)
  --shutdown-timeout SECS  on SIGTERM, let requests finish for this long;
                           without it, in-flight requests are aborted

environment knobs:
  FAKE_VLLM_LOAD_TIME          model load time, port closed meanwhile (0s)
  FAKE_VLLM_TOKENS_PER_SECOND  generation pace, or `inf` (100)
  FAKE_VLLM_TTFT               delay before the first token (0s)
  FAKE_VLLM_MAX_TOKENS         tokens per reply when unspecified (16)
  FAKE_VLLM_FAULT              none | exit-during-load | crash-after:N |
                               error-500:N | hang

test controls (not part of vLLM): POST /_fake/hold, POST /_fake/release,
POST /_fake/fault (body: a fault), GET /_fake/stats
";

/// vLLM boolean flags, so that `--enforce-eager MODEL` leaves MODEL
/// positional instead of taking it as the flag's value.
const KNOWN_BOOLEAN_FLAGS: &[&str] = &[
    "--enforce-eager",
    "--trust-remote-code",
    "--disable-log-requests",
    "--enable-log-requests",
    "--disable-log-stats",
    "--enable-prefix-caching",
    "--enable-chunked-prefill",
    "--enable-auto-tool-choice",
    "--enable-lora",
    "--enable-sleep-mode",
    "--disable-frontend-multiprocessing",
    "--disable-custom-all-reduce",
    "--disable-sliding-window",
    "--skip-tokenizer-init",
    "--headless",
    "--enable-expert-parallel",
    "--enable-prompt-tokens-details",
    "--enable-server-load-tracking",
    "--disable-fastapi-docs",
    "--enable-request-id-headers",
    "--disable-uvicorn-access-log",
];

fn parse_command_line(args: Vec<String>) -> Result<Config, ArgsError> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        return Err(ArgsError::HelpRequested);
    }
    let mut args = args.into_iter().peekable();
    match args.next().as_deref() {
        Some("serve") => {}
        Some(other) => {
            return Err(usage(format!(
                "argument subparser: invalid choice: '{other}' (choose from 'serve')"
            )));
        }
        None => return Err(usage("a subcommand is required: serve")),
    }

    let mut model: Option<String> = None;
    let mut served: Vec<String> = Vec::new();
    let mut config = Config::new(String::new());

    while let Some(token) = args.next() {
        if !is_flag(&token) {
            if model.is_some() {
                return Err(usage(format!("unrecognized arguments: {token}")));
            }
            model = Some(token);
            continue;
        }
        let (flag, inline) = match token.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (token, None),
        };
        // `--flag value` or `--flag=value`; `None` when no value follows.
        let value = |args: &mut std::iter::Peekable<std::vec::IntoIter<String>>| {
            inline
                .clone()
                .or_else(|| args.next_if(|next| !is_flag(next)))
        };
        match flag.as_str() {
            "--served-model-name" => {
                if let Some(name) = inline.clone() {
                    served.push(name);
                } else {
                    while let Some(name) = args.next_if(|next| !is_flag(next)) {
                        served.push(name);
                    }
                }
                if served.is_empty() {
                    return Err(usage(
                        "argument --served-model-name: expected at least one argument",
                    ));
                }
            }
            "--model" => model = Some(required(&flag, value(&mut args))?),
            "--api-key" => config.api_key = Some(ApiKey(required(&flag, value(&mut args))?)),
            "--host" => config.host = required(&flag, value(&mut args))?,
            "--port" => config.port = number(&flag, value(&mut args))?,
            "--max-num-seqs" => config.max_num_seqs = number(&flag, value(&mut args))?,
            "--max-model-len" => {
                let raw = required(&flag, value(&mut args))?;
                config.max_model_len = human_int(&raw).ok_or_else(|| {
                    usage(format!("argument --max-model-len: invalid value: '{raw}'"))
                })?;
            }
            "--shutdown-timeout" => {
                let raw = required(&flag, value(&mut args))?;
                let secs = raw
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| {
                        usage(format!(
                            "argument --shutdown-timeout: invalid seconds value: '{raw}'"
                        ))
                    })?;
                config.shutdown_timeout = Some(Duration::from_secs_f64(secs));
            }
            _ => {
                let boolean = KNOWN_BOOLEAN_FLAGS.contains(&flag.as_str())
                    || (flag.starts_with("--no-") && inline.is_none());
                let taken = if boolean {
                    inline.clone()
                } else {
                    value(&mut args)
                };
                config.extra_flags.push(match taken {
                    Some(v) => format!("{flag} {v}"),
                    None => flag,
                });
            }
        }
    }

    let model =
        model.ok_or_else(|| usage("the following arguments are required: MODEL (or --model)"))?;
    config.served_model_names = if served.is_empty() {
        vec![model.clone()]
    } else {
        served
    };
    config.model = model;
    Ok(config)
}

/// A `-x`/`--xyz` token; a negative number is a value, not a flag.
fn is_flag(token: &str) -> bool {
    token.len() > 1 && token.starts_with('-') && token.parse::<f64>().is_err()
}

fn required(flag: &str, value: Option<String>) -> Result<String, ArgsError> {
    value.ok_or_else(|| usage(format!("argument {flag}: expected one argument")))
}

fn number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, ArgsError> {
    let raw = required(flag, value)?;
    raw.parse()
        .map_err(|_| usage(format!("argument {flag}: invalid int value: '{raw}'")))
}

/// vLLM's `human_readable_int`: `4096`, `32k` (×1000), `32K` (×1024), `1m`, `1M`.
fn human_int(raw: &str) -> Option<u64> {
    let (digits, scale) = match raw.char_indices().last()? {
        (i, 'k') => (&raw[..i], 1_000),
        (i, 'K') => (&raw[..i], 1 << 10),
        (i, 'm') => (&raw[..i], 1_000_000),
        (i, 'M') => (&raw[..i], 1 << 20),
        (i, 'g') => (&raw[..i], 1_000_000_000),
        (i, 'G') => (&raw[..i], 1 << 30),
        _ => (raw, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

pub const LOAD_TIME: &str = "FAKE_VLLM_LOAD_TIME";
pub const TOKENS_PER_SECOND: &str = "FAKE_VLLM_TOKENS_PER_SECOND";
pub const TTFT: &str = "FAKE_VLLM_TTFT";
pub const MAX_TOKENS: &str = "FAKE_VLLM_MAX_TOKENS";
pub const FAULT: &str = "FAKE_VLLM_FAULT";

fn apply_knobs(config: &mut Config, env: impl Fn(&str) -> Option<String>) -> Result<(), ArgsError> {
    // An empty value counts as unset, as `FOO= cmd` in a shell intends.
    let get = |var: &str| env(var).filter(|v| !v.trim().is_empty());
    let knob = |var: &'static str, value: &str, expected: &'static str| ArgsError::Knob {
        var,
        value: value.to_owned(),
        expected,
    };
    let duration = |var: &'static str| -> Result<Option<Duration>, ArgsError> {
        get(var)
            .map(|raw| {
                humantime::parse_duration(raw.trim())
                    .map_err(|_| knob(var, &raw, "a duration such as `2s`, `500ms` or `0s`"))
            })
            .transpose()
    };

    if let Some(d) = duration(LOAD_TIME)? {
        config.load_time = d;
    }
    if let Some(d) = duration(TTFT)? {
        config.ttft = d;
    }
    if let Some(raw) = get(TOKENS_PER_SECOND) {
        config.tokens_per_second = raw
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|r| *r > 0.0)
            .ok_or_else(|| {
                knob(
                    TOKENS_PER_SECOND,
                    &raw,
                    "a positive number of tokens per second (or `inf`)",
                )
            })?;
    }
    if let Some(raw) = get(MAX_TOKENS) {
        config.default_max_tokens = raw
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| knob(MAX_TOKENS, &raw, "a positive whole number of tokens"))?;
    }
    if let Some(raw) = get(FAULT) {
        config.fault = raw.parse().map_err(|_| {
            knob(
                FAULT,
                &raw,
                "one of none, exit-during-load, crash-after:N, error-500:N, hang",
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ArgsError> {
        Config::from_args(args.iter().map(|s| s.to_string()), |_| None)
    }

    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ArgsError> {
        Config::from_args(args.iter().map(|s| s.to_string()), |k| {
            env.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_serve_the_model_under_its_own_name() {
        let c = parse(&["serve", "org/model"]).expect("parses");
        assert_eq!(c, Config::new("org/model"));
        assert_eq!(c.served_model_names, ["org/model"]);
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8000));
        assert_eq!(c.max_num_seqs, 256);
        assert_eq!(c.shutdown_timeout, None);
    }

    #[test]
    fn served_model_name_takes_several_names_until_the_next_flag() {
        let c = parse(&[
            "serve",
            "m",
            "--served-model-name",
            "a",
            "b",
            "--port",
            "9000",
        ])
        .expect("parses");
        assert_eq!(c.served_model_names, ["a", "b"]);
        assert_eq!(c.port, 9000);
        let c = parse(&["serve", "--served-model-name=a", "m"]).expect("parses");
        assert_eq!(
            (c.model.as_str(), c.served_model_names.as_slice()),
            ("m", &["a".to_owned()][..])
        );
    }

    #[test]
    fn accepts_flag_equals_value_and_model_flag() {
        let c = parse(&[
            "serve",
            "--model=org/m",
            "--host=0.0.0.0",
            "--port=1234",
            "--max-num-seqs=2",
            "--shutdown-timeout=1.5",
            "--max-model-len=32k",
        ])
        .expect("parses");
        assert_eq!(c.model, "org/m");
        assert_eq!(c.host, "0.0.0.0");
        assert_eq!(c.port, 1234);
        assert_eq!(c.max_num_seqs, 2);
        assert_eq!(c.shutdown_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(c.max_model_len, 32_000);
    }

    #[test]
    fn the_api_key_may_come_from_vllm_api_key_as_in_vllm() {
        let c = parse_env(&["serve", "m"], &[("VLLM_API_KEY", "sk-env")]).expect("parses");
        assert_eq!(c.api_key.map(|k| k.0).as_deref(), Some("sk-env"));
        let c = parse_env(
            &["serve", "m", "--api-key", "sk-flag"],
            &[("VLLM_API_KEY", "sk-env")],
        )
        .expect("parses");
        assert_eq!(c.api_key.map(|k| k.0).as_deref(), Some("sk-flag"));
    }

    #[test]
    fn the_api_key_is_kept_apart_and_never_printed() {
        let c = parse(&["serve", "m", "--api-key", "sk-1", "--enforce-eager"]).expect("parses");
        assert_eq!(c.api_key, Some(ApiKey("sk-1".into())));
        assert_eq!(c.extra_flags, ["--enforce-eager"]);
        assert!(!format!("{c:?}").contains("sk-1"));
    }

    #[test]
    fn collects_unknown_flags_with_their_values() {
        let c = parse(&[
            "serve",
            "m",
            "--max-num-batched-tokens",
            "4096",
            "--enforce-eager",
            "--dtype=half",
            "--no-enable-prefix-caching",
            "-tp",
            "2",
            "--kv-cache-dtype",
        ])
        .expect("parses");
        assert_eq!(
            c.extra_flags,
            [
                "--max-num-batched-tokens 4096",
                "--enforce-eager",
                "--dtype half",
                "--no-enable-prefix-caching",
                "-tp 2",
                "--kv-cache-dtype"
            ]
        );
        // A known boolean flag does not swallow the positional model.
        let c = parse(&["serve", "--enforce-eager", "m"]).expect("parses");
        assert_eq!(c.model, "m");
    }

    #[test]
    fn usage_errors_exit_2_and_help_exits_0() {
        for args in [
            &["serve"][..],
            &[],
            &["chat", "m"],
            &["serve", "m", "extra"],
            &["serve", "m", "--port", "high"],
            &["serve", "m", "--port"],
            &["serve", "m", "--served-model-name"],
            &["serve", "m", "--max-num-seqs", "0"],
            &["serve", "m", "--shutdown-timeout", "-1"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?}"));
            assert!(matches!(err, ArgsError::Usage(_)), "{args:?}: {err:?}");
            assert_eq!(err.exit_code(), 2);
        }
        assert!(
            parse(&["serve"])
                .expect_err("no model")
                .to_string()
                .contains("MODEL")
        );
        let help = parse(&["serve", "--help"]).expect_err("help");
        assert_eq!(
            (help.clone(), help.exit_code()),
            (ArgsError::HelpRequested, 0)
        );
    }

    #[test]
    fn knobs_are_read_from_the_given_environment() {
        let c = parse_env(
            &["serve", "m"],
            &[
                (LOAD_TIME, "2s"),
                (TTFT, "150ms"),
                (TOKENS_PER_SECOND, "20"),
                (MAX_TOKENS, "5"),
                (FAULT, "error-500:3"),
            ],
        )
        .expect("parses");
        assert_eq!(c.load_time, Duration::from_secs(2));
        assert_eq!(c.ttft, Duration::from_millis(150));
        assert_eq!(c.tokens_per_second, 20.0);
        assert_eq!(c.token_period(), Duration::from_millis(50));
        assert_eq!(c.default_max_tokens, 5);
        assert_eq!(c.fault, Fault::Error500(3));
        let c = parse_env(
            &["serve", "m"],
            &[(TOKENS_PER_SECOND, "inf"), (LOAD_TIME, "")],
        )
        .expect("parses");
        assert_eq!(c.token_period(), Duration::ZERO);
        assert_eq!(c.load_time, Duration::ZERO);
    }

    #[test]
    fn bad_knobs_name_the_variable_and_what_it_expects() {
        for (var, value, expected) in [
            (LOAD_TIME, "soon", "duration"),
            (TTFT, "5 parsecs", "duration"),
            (TOKENS_PER_SECOND, "fast", "positive number"),
            (TOKENS_PER_SECOND, "0", "positive number"),
            (MAX_TOKENS, "-3", "whole number"),
            (FAULT, "explode", "crash-after:N"),
        ] {
            let err = parse_env(&["serve", "m"], &[(var, value)]).expect_err(var);
            let text = err.to_string();
            assert_eq!(err.exit_code(), 2);
            assert!(
                text.contains(var) && text.contains(value) && text.contains(expected),
                "{text}"
            );
        }
    }
}
