use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;
use crate::Secret;

/// A configuration shaped like the programs' own: sections, addresses,
/// durations, enums, lists, a secret.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct Sample {
    worker_id: String,
    listen: Listen,
    engine: Engine,
    agents: Vec<String>,
    api_key: Secret<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct Listen {
    public: SocketAddr,
    admin: SocketAddr,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct Engine {
    runtime: Runtime,
    port: u16,
    state_dir: PathBuf,
    #[serde(with = "humantime_serde")]
    drain_timeout: Duration,
    shutdown_timeout_seconds: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Runtime {
    Process,
    Container,
}

impl Default for Sample {
    fn default() -> Self {
        Self {
            worker_id: "host-a".into(),
            listen: Listen::default(),
            engine: Engine::default(),
            agents: Vec::new(),
            api_key: Secret::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            public: "127.0.0.1:8080".parse().unwrap(),
            admin: "127.0.0.1:9401".parse().unwrap(),
        }
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self {
            runtime: Runtime::Process,
            port: 8000,
            state_dir: "/var/lib/crossfade".into(),
            drain_timeout: Duration::from_secs(600),
            shutdown_timeout_seconds: None,
        }
    }
}

impl Validate for Sample {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        errors.extend(FieldError::check_range(
            "engine.port",
            self.engine.port,
            1024..=65535,
        ));
        if self.listen.public == self.listen.admin {
            errors.push(FieldError::new(
                "listen.admin",
                "must differ from listen.public",
            ));
        }
        errors
    }
}

fn file(text: &str) -> tempfile_lite::File {
    tempfile_lite::File::new(text)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn flags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    env(pairs)
}

#[test]
fn defaults_apply_without_any_source() {
    let config: Sample = load(&Sources::default()).unwrap();
    assert_eq!(config, Sample::default());
}

#[test]
fn file_then_environment_then_flags() {
    let f = file(
        r#"
        worker_id = "from-file"
        [listen]
        public = "0.0.0.0:8081"
        [engine]
        port = 9000
        drain_timeout = "30s"
        "#,
    );
    let sources = Sources {
        file: Some(f.path()),
        env: env(&[
            ("CROSSFADE_ENGINE__PORT", "9100"),
            ("CROSSFADE_ENGINE__RUNTIME", "container"),
            ("CROSSFADE_ENGINE__STATE_DIR", "/srv/state"),
            ("PATH", "/usr/bin"),
            ("CROSSFADE_WORKER_ID", "from-env"),
        ]),
        flags: flags(&[("engine.port", "9200")]),
    };
    let config: Sample = load(&sources).unwrap();
    assert_eq!(config.worker_id, "from-env");
    assert_eq!(config.listen.public, "0.0.0.0:8081".parse().unwrap());
    assert_eq!(config.listen.admin, Listen::default().admin);
    assert_eq!(
        config.engine.port, 9200,
        "the flag wins over the environment"
    );
    assert_eq!(config.engine.runtime, Runtime::Container);
    assert_eq!(config.engine.state_dir, PathBuf::from("/srv/state"));
    assert_eq!(config.engine.drain_timeout, Duration::from_secs(30));
}

#[test]
fn another_programs_variable_is_not_a_configuration_key() {
    // The CLI's variables, set in the same shell as a server.
    let sources = Sources {
        env: env(&[
            ("CROSSFADE_COORDINATOR", "https://10.0.0.5:7000"),
            ("CROSSFADE_CA", "ca.pem"),
        ]),
        ..Default::default()
    };
    let config: Sample = load(&sources).unwrap();
    assert_eq!(config, Sample::default());
    // With a section, a variable is this program's: a typo is named.
    let sources = Sources {
        env: env(&[("CROSSFADE_ENGINE__PROT", "1")]),
        ..Default::default()
    };
    let error = load::<Sample>(&sources).unwrap_err();
    assert!(
        error.to_string().contains("CROSSFADE_ENGINE__PROT"),
        "{error}"
    );
    // A flag is always this program's.
    let sources = Sources {
        flags: flags(&[("coordinator", "x")]),
        ..Default::default()
    };
    assert!(load::<Sample>(&sources).is_err());
}

#[test]
fn a_string_key_keeps_digits_as_a_string() {
    let sources = Sources {
        env: env(&[("CROSSFADE_WORKER_ID", "0042")]),
        ..Default::default()
    };
    let config: Sample = load(&sources).unwrap();
    assert_eq!(config.worker_id, "0042");
}

#[test]
fn lists_from_the_environment_as_toml_or_commas() {
    for raw in [
        r#"["10.0.0.1:7000", "10.0.0.2:7000"]"#,
        "10.0.0.1:7000, 10.0.0.2:7000",
    ] {
        let sources = Sources {
            env: env(&[("CROSSFADE_AGENTS", raw)]),
            ..Default::default()
        };
        let config: Sample = load(&sources).unwrap();
        assert_eq!(config.agents, ["10.0.0.1:7000", "10.0.0.2:7000"], "{raw}");
    }
}

#[test]
fn an_optional_key_absent_from_the_defaults_is_typed_by_its_value() {
    let sources = Sources {
        flags: flags(&[("engine.shutdown_timeout_seconds", "30")]),
        ..Default::default()
    };
    let config: Sample = load(&sources).unwrap();
    assert_eq!(config.engine.shutdown_timeout_seconds, Some(30));
}

#[test]
fn a_wrongly_typed_override_names_the_variable_and_the_key() {
    let sources = Sources {
        env: env(&[("CROSSFADE_ENGINE__PORT", "eighty")]),
        ..Default::default()
    };
    let err = load::<Sample>(&sources).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("CROSSFADE_ENGINE__PORT"), "{text}");
    assert!(text.contains("engine.port"), "{text}");
    assert!(text.contains("an integer"), "{text}");
    assert_eq!(err.keys(), ["engine.port"]);
}

#[test]
fn an_unparsable_value_names_the_key_and_its_origin() {
    let sources = Sources {
        env: env(&[("CROSSFADE_LISTEN__PUBLIC", "localhost")]),
        ..Default::default()
    };
    let err = load::<Sample>(&sources).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.keys(), ["listen.public"], "{text}");
    assert!(text.contains("CROSSFADE_LISTEN__PUBLIC"), "{text}");
}

#[test]
fn an_unknown_key_in_the_file_is_refused_by_name() {
    let f = file("[listen]\npublik = \"0.0.0.0:1\"\n");
    let sources = Sources {
        file: Some(f.path()),
        ..Default::default()
    };
    let err = load::<Sample>(&sources).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("listen"), "{text}");
    assert!(text.contains("publik"), "{text}");
}

#[test]
fn an_unknown_enum_value_lists_the_allowed_ones() {
    let sources = Sources {
        flags: flags(&[("engine.runtime", "vm")]),
        ..Default::default()
    };
    let err = load::<Sample>(&sources).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.keys(), ["engine.runtime"]);
    assert!(
        text.contains("process") && text.contains("container"),
        "{text}"
    );
    assert!(text.contains("--set engine.runtime"), "{text}");
}

#[test]
fn a_malformed_key_is_refused() {
    for (name, value) in [("CROSSFADE_ENGINE____PORT", "1"), ("CROSSFADE_", "1")] {
        let sources = Sources {
            env: env(&[(name, value)]),
            ..Default::default()
        };
        let err = load::<Sample>(&sources).unwrap_err();
        assert!(matches!(err, ConfigError::Override { .. }), "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn a_value_cannot_smuggle_in_another_key() {
    let sources = Sources {
        env: env(&[("CROSSFADE_WORKER_ID", "\"a\"\nagents = [\"x\"]")]),
        ..Default::default()
    };
    let config: Sample = load(&sources).unwrap();
    assert!(config.agents.is_empty());
}

#[test]
fn validation_reports_every_problem_with_its_key() {
    let sources = Sources {
        flags: flags(&[("engine.port", "80"), ("listen.admin", "127.0.0.1:8080")]),
        ..Default::default()
    };
    let err = load::<Sample>(&sources).unwrap_err();
    assert_eq!(err.keys(), ["engine.port", "listen.admin"]);
    let text = err.to_string();
    assert!(
        text.contains("must be within 1024..=65535, got 80"),
        "{text}"
    );
}

#[test]
fn file_errors_say_which_file_and_where() {
    let missing = Sources {
        file: Some("/nonexistent/crossfade.toml".into()),
        ..Default::default()
    };
    let err = load::<Sample>(&missing).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/crossfade.toml"));

    let f = file("[listen\npublic = 1\n");
    let broken = Sources {
        file: Some(f.path()),
        ..Default::default()
    };
    let err = load::<Sample>(&broken).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }));
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn secrets_load_but_never_print() {
    let sources = Sources {
        env: env(&[("CROSSFADE_API_KEY", "sk-secret-value")]),
        ..Default::default()
    };
    let config: Sample = load(&sources).unwrap();
    assert_eq!(config.api_key.expose(), "sk-secret-value");
    let printed = toml::to_string_pretty(&config).unwrap();
    assert!(!printed.contains("sk-secret-value"), "{printed}");
}

#[test]
fn common_args_parse_set_flags() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }
    let cli = Cli::try_parse_from([
        "prog",
        "--config",
        "router.toml",
        "--set",
        "listen.public=0.0.0.0:80",
        "--set",
        "log.filter=info,hyper=warn",
    ])
    .unwrap();
    assert_eq!(cli.common.config, Some(PathBuf::from("router.toml")));
    assert_eq!(
        cli.common.set,
        [
            ("listen.public".to_owned(), "0.0.0.0:80".to_owned()),
            ("log.filter".to_owned(), "info,hyper=warn".to_owned())
        ]
    );
    assert!(Cli::try_parse_from(["prog", "--set", "novalue"]).is_err());
}

/// A temporary file removed on drop, without a dependency for it.
mod tempfile_lite {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub struct File(PathBuf);

    impl File {
        pub fn new(text: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "crossfade-config-test-{}-{}.toml",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        pub fn path(&self) -> PathBuf {
            self.0.clone()
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn a_duration_out_of_range_is_named_in_configuration_units() {
    let range = Duration::from_millis(100)..=Duration::from_secs(120);
    assert_eq!(
        FieldError::check_duration(
            "engine.ready_timeout",
            Duration::from_secs(600),
            range.clone()
        )
        .map(|e| e.to_string()),
        Some("`engine.ready_timeout`: must be within 100ms..=2m, got 10m".to_owned())
    );
    assert_eq!(
        FieldError::check_duration("engine.ready_timeout", Duration::from_secs(1), range),
        None
    );
}
