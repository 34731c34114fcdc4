//! `coordinator.toml`: listeners, the store, and the agents and routers
//! known from the start (more can be added at run time).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crossfade_common::FieldError;
use crossfade_common::config::Validate;
use crossfade_common::telemetry::LogConfig;
use crossfade_proto::tls::ControlTls;
use serde::{Deserialize, Serialize};

/// The coordinator's whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listening addresses.
    pub listen: Listen,
    /// Logging.
    pub log: LogConfig,
    /// Mutual TLS on the control plane (or, explicitly, plain text).
    pub control_tls: ControlTls,
    /// Where the state is kept: embedded, or etcd (with leader election).
    pub store: StoreConfig,
    /// Agents' control addresses (`host:port`).
    pub agents: Vec<String>,
    /// Routers' control addresses (`host:port`).
    pub routers: Vec<String>,
    /// How long a router may take to acknowledge a table before a drain
    /// goes ahead without it (1s ..= 10m).
    #[serde(with = "humantime_serde")]
    pub router_ack_timeout: Duration,
    /// Variables of the coordinator's environment that templates may read
    /// (`from_coordinator_env`), e.g. `["HF_TOKEN"]`; none by default, so
    /// a template cannot read the coordinator's other secrets.
    pub template_env: Vec<String>,
}

/// `[listen]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// The Coordinator gRPC API, for the CLI and CI/CD.
    pub api: SocketAddr,
    /// Prometheus `/metrics` and `/healthz`.
    pub admin: SocketAddr,
    /// The REST/JSON API (`/v1/...`, described by `/openapi.json`) and the
    /// web dashboard (`/`); off when unset. On a loopback address, plain
    /// HTTP (reach it from elsewhere through an SSH tunnel); on any other,
    /// HTTPS that takes only a client certificate from the fleet CA naming
    /// the `operator` role, as the gRPC API does (so control_tls must not
    /// be `insecure`).
    pub http: Option<SocketAddr>,
}

/// `[store]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `embedded` (one coordinator, its records in `path`) or `etcd`
    /// (several coordinators, one leading, on `[store.etcd]`).
    pub backend: BackendKind,
    /// The embedded store's file (SQLite).
    pub path: PathBuf,
    /// etcd, for `backend = "etcd"`.
    pub etcd: EtcdConfig,
}

/// Which store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// SQLite, one file.
    Embedded,
    /// etcd, with leader election.
    Etcd,
}

/// `[store.etcd]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// etcd's client endpoints (`host:port` or `http://host:port`).
    pub endpoints: Vec<String>,
    /// The prefix of every key this fleet's coordinators use.
    pub prefix: String,
    /// The leader's lease (2s ..= 60s): a leader silent this long is
    /// replaced; a standby takes over within about this long.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// The bound on each call to etcd (1s ..= 60s).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The API address standbys name when they refuse a change, and the
    /// CLI follows (`host:port`); by default this host's name and the
    /// port of `listen.api`.
    pub advertise_api: String,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/crossfade/".into(),
            lease_ttl: Duration::from_secs(3),
            timeout: Duration::from_secs(5),
            advertise_api: String::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Listen::default(),
            log: LogConfig::default(),
            control_tls: ControlTls::default(),
            store: StoreConfig::default(),
            agents: Vec::new(),
            routers: Vec::new(),
            router_ack_timeout: crate::actor::ROUTER_ACK_BOUND,
            template_env: Vec::new(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        let parse = |s: &str| s.parse().expect("the default addresses are valid");
        Self {
            api: parse("0.0.0.0:7000"),
            admin: parse("127.0.0.1:9403"),
            http: None,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Embedded,
            path: "/var/lib/crossfade-coordinator/state.db".into(),
            etcd: EtcdConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.log.validate("log");
        errors.extend(
            self.control_tls
                .validate("control_tls", &[("listen.api", self.listen.api)]),
        );
        let mut listeners = vec![
            ("listen.api", self.listen.api),
            ("listen.admin", self.listen.admin),
        ];
        if let Some(http) = self.listen.http {
            listeners.push(("listen.http", http));
            if !http.ip().is_loopback() && self.control_tls.insecure {
                errors.push(FieldError::new(
                    "listen.http",
                    format!(
                        "`{http}` is not a loopback address, and control_tls is plain text: beyond loopback the REST API and the dashboard take mutual TLS with an operator certificate, as the gRPC API does (set control_tls.ca, cert and key), or bind them to 127.0.0.1 and reach them through an SSH tunnel"
                    ),
                ));
            }
        }
        errors.extend(FieldError::distinct_listeners(&listeners));
        match self.store.backend {
            BackendKind::Embedded if self.store.path.as_os_str().is_empty() => {
                errors.push(FieldError::new("store.path", "must name a file"));
            }
            BackendKind::Embedded => {}
            BackendKind::Etcd => {
                if !cfg!(feature = "etcd") {
                    errors.push(FieldError::new(
                        "store.backend",
                        "`etcd` needs a crossfade-coordinator built with `--features etcd`; \
                         this one has the embedded store only",
                    ));
                }
                let etcd = &self.store.etcd;
                if etcd.endpoints.is_empty() {
                    errors.push(FieldError::new(
                        "store.etcd.endpoints",
                        "must name at least one etcd endpoint",
                    ));
                }
                if !etcd.prefix.ends_with('/') {
                    errors.push(FieldError::new(
                        "store.etcd.prefix",
                        format!("must end with `/`, got `{}`", etcd.prefix),
                    ));
                }
                errors.extend(FieldError::check_duration(
                    "store.etcd.lease_ttl",
                    etcd.lease_ttl,
                    Duration::from_secs(2)..=Duration::from_secs(60),
                ));
                errors.extend(FieldError::check_duration(
                    "store.etcd.timeout",
                    etcd.timeout,
                    Duration::from_secs(1)..=Duration::from_secs(60),
                ));
                if !etcd.advertise_api.is_empty()
                    && !etcd
                        .advertise_api
                        .rsplit_once(':')
                        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                {
                    errors.push(FieldError::new(
                        "store.etcd.advertise_api",
                        format!("must be host:port, got `{}`", etcd.advertise_api),
                    ));
                }
            }
        }
        errors.extend(self.control_tls.check_peers("agents", &self.agents));
        errors.extend(self.control_tls.check_peers("routers", &self.routers));
        for (i, name) in self.template_env.iter().enumerate() {
            if name.is_empty() || name.contains(['=', '\0']) {
                errors.push(FieldError::new(
                    format!("template_env[{i}]"),
                    "must be a variable name, without `=`",
                ));
            }
        }
        errors.extend(FieldError::check_duration(
            "router_ack_timeout",
            self.router_ack_timeout,
            Duration::from_secs(1)..=Duration::from_secs(600),
        ));
        errors
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_addresses_and_bounds_are_named() {
        let config = Config {
            agents: vec![
                "127.0.0.1:7002".into(),
                "nohost".into(),
                "10.0.0.1:7002".into(),
            ],
            routers: vec![":7001".into()],
            router_ack_timeout: Duration::from_millis(10),
            control_tls: ControlTls {
                insecure: true,
                ..ControlTls::default()
            },
            ..Config::default()
        };
        let errors: Vec<String> = config.validate().iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "`listen.api`: `0.0.0.0:7000` is not a loopback address: plain-text control calls there are open to the network; set control_tls.ca, cert and key (see `crossfade certs`), or control_tls.insecure_remote = true",
                "`agents[1]`: `nohost` must be host:port",
                "`agents[2]`: `10.0.0.1:7002` is not a loopback address: control calls in plain text would cross the network; use certificates (control_tls.ca, cert and key) or control_tls.insecure_remote = true",
                "`routers[0]`: `:7001` must be host:port",
                "`router_ack_timeout`: must be within 1s..=10m, got 10ms",
            ]
        );
        let keys: Vec<String> = Config::default()
            .validate()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(
            keys,
            ["control_tls.ca", "control_tls.cert", "control_tls.key"]
        );
    }

    #[test]
    fn the_shipped_example_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/config/coordinator.toml");
        let config: Config = crossfade_common::config::load(&crossfade_common::config::Sources {
            file: Some(path),
            env: Vec::new(),
            flags: Vec::new(),
        })
        .unwrap();
        assert_eq!(config.agents.len(), 4);
        assert_eq!(config.routers, ["10.0.0.9:7001"]);
        assert_eq!(config.router_ack_timeout, Duration::from_secs(10));
        assert_eq!(config.template_env, ["HF_TOKEN"]);
        assert_eq!(
            config.control_tls.cert.as_deref(),
            Some(std::path::Path::new("/etc/crossfade/certs/coordinator.pem"))
        );
        assert_eq!(config.listen.http, Some("127.0.0.1:7080".parse().unwrap()));
        assert!(config.validate().is_empty(), "{:?}", config.validate());
    }

    #[test]
    fn the_dashboard_is_plain_on_loopback_only_and_apart_from_other_listeners() {
        let mut config = Config::default();
        config.control_tls.insecure = true;
        config.listen.api = "127.0.0.1:7000".parse().unwrap();
        config.listen.http = Some("0.0.0.0:7080".parse().unwrap());
        let errors = config.validate();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "listen.http");
        assert!(
            errors[0].to_string().contains("mutual TLS"),
            "{}",
            errors[0]
        );
        // With the fleet's mutual TLS, any address: HTTPS for operators.
        let mut mutual = config.clone();
        mutual.control_tls.insecure = false;
        mutual.control_tls.ca = Some("ca.pem".into());
        mutual.control_tls.cert = Some("coordinator.pem".into());
        mutual.control_tls.key = Some("coordinator.key".into());
        let keys: Vec<String> = mutual.validate().into_iter().map(|e| e.key).collect();
        assert!(!keys.contains(&"listen.http".to_owned()), "{keys:?}");
        config.listen.http = Some(config.listen.admin);
        let keys: Vec<String> = config.validate().into_iter().map(|e| e.key).collect();
        assert!(keys.iter().any(|k| k.starts_with("listen.")), "{keys:?}");
        config.listen.http = Some("127.0.0.1:7080".parse().unwrap());
        assert!(config.validate().is_empty());
    }
}
