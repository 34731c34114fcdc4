//! `router.toml`: listeners, limits, upstream behaviour, and the static
//! routing table (`[[endpoint]]`), which the router serves until a
//! coordinator pushes one and which SIGHUP re-reads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crossfade_common::FieldError;
use crossfade_common::config::Validate;
use crossfade_common::telemetry::LogConfig;
use crossfade_proto::tls::ControlTls;
use crossfade_proto::v1;
use serde::{Deserialize, Serialize};

use crate::proxy::ProxySettings;
use crate::table::{EjectionPolicy, MAX_WEIGHT, Shared, Source, Table};

/// Default public listener.
pub const DEFAULT_PUBLIC: &str = "0.0.0.0:8080";
/// Default admin listener (`/metrics`, `/healthz`, `/readyz`): loopback only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9401";
/// Default control listener (RouterControl gRPC).
pub const DEFAULT_CONTROL: &str = "0.0.0.0:7001";
/// Largest request body, in bytes: generous for long prompts, bounded
/// because it is kept in memory for retries.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;
/// Longest time a client may take to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per client connection.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// How long shutdown waits for in-flight requests.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The router's whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identifies this router in stats and logs; its control address when empty.
    pub router_id: String,
    /// Listening addresses.
    pub listen: Listen,
    /// Logging.
    pub log: LogConfig,
    /// Mutual TLS on the control plane (or, explicitly, plain text).
    pub control_tls: ControlTls,
    /// TLS on the public listener.
    pub public_tls: PublicTls,
    /// API keys of the public listener.
    pub auth: Auth,
    /// Limits on what clients may send.
    pub limits: Limits,
    /// How requests are sent to gates.
    pub upstream: Upstream,
    /// The admin listener's `/metrics`.
    pub metrics: Metrics,
    /// The coordinator the router tells of demand.
    pub coordinator: CoordinatorConfig,
    /// The static routing table.
    pub endpoint: Vec<EndpointConfig>,
}

/// `[listen]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Public, OpenAI-compatible listener.
    pub public: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Control listener (gRPC).
    pub control: SocketAddr,
}

/// `[public_tls]`: TLS on the public listener (ALPN `h2` and
/// `http/1.1`); re-read on SIGHUP without dropping connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicTls {
    /// The certificate chain (PEM); plain HTTP when unset.
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// The API keys file (`crossfade keys` writes it): when set, every
    /// request needs one of its keys. Re-read when it changes.
    pub api_keys: Option<PathBuf>,
}

/// `[coordinator]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// The coordinators' API addresses (`host:port`), told at once when an
    /// endpoint with no replica gets a request, so that it scales from zero
    /// without waiting for the coordinator's next read of the router's stats
    /// (every 2 s). Empty: that read alone.
    pub api: Vec<String>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// How long the series of a deployment that left every table stay in
    /// `/metrics`, for a last scrape of its counts (1s ..= 1d).
    #[serde(with = "humantime_serde")]
    pub retired_series_grace: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            retired_series_grace: crate::stats::RETIRED_SERIES_GRACE,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body, in bytes (1 ..= 1 GiB).
    pub max_body_bytes: usize,
    /// Longest time a request's body may take to arrive once its headers
    /// have (1s ..= 10m); past it, 408. A client that trickles a body in
    /// holds its concurrency slot no longer.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Longest time to receive a request's headers (hyper's header read
    /// timeout, which is off unless set with a timer).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection (1 ..= 10000).
    pub h2_max_concurrent_streams: u32,
    /// Requests in flight through the router at once (1 ..= 1000000); more
    /// are shed with 429 and `Retry-After`. A request takes its slot once
    /// its body has arrived.
    pub max_concurrent_requests: u32,
    /// Requests in flight, bodies being read included, from one client:
    /// one API key, else one address (1 ..= 1000000); more get 429. A key
    /// may carry its own limit.
    pub max_concurrent_per_client: u32,
    /// Slowest body accepted, in bytes a second, judged after its first
    /// 5 s (0 ..= 1 GiB/s; 0: no minimum); slower ones get 408.
    pub min_body_rate: u32,
    /// Most requests held per endpoint while it has no replica (0 ..=
    /// 1000000; 0: none is held); more get 503.
    pub queue_max: usize,
    /// Longest a request is held for a replica (0s ..= 10m, and never past
    /// `upstream.response_header_timeout`); then 503 with `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Most header fields in a request (1 ..= 100); more get 431.
    pub max_header_count: usize,
    /// Most bytes of header fields in a request, 32 bytes counted per
    /// field as HTTP/2 does (1 KiB ..= 128 KiB); more get 431.
    pub max_header_bytes: usize,
    /// How long shutdown waits for in-flight requests to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// `[upstream]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// Longest time to connect to a gate.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for response headers (the time to first token).
    #[serde(with = "humantime_serde")]
    pub response_header_timeout: Duration,
    /// Longest gap between two chunks of a response.
    #[serde(with = "humantime_serde")]
    pub idle_chunk_timeout: Duration,
    /// How long idle pooled connections to gates are kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Most attempts per request, the first included (1 ..= 10).
    pub max_attempts: u32,
    /// First ejection of a worker that refuses connections.
    #[serde(with = "humantime_serde")]
    pub ejection_base: Duration,
    /// Longest ejection.
    #[serde(with = "humantime_serde")]
    pub ejection_max: Duration,
}

/// `[[endpoint]]`: one endpoint of the static table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The `model` name clients send.
    pub name: String,
    /// Other names that route here.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Its deployments, `[[endpoint.deployment]]`.
    #[serde(default)]
    pub deployment: Vec<DeploymentConfig>,
}

/// `[[endpoint.deployment]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    /// Deployment id, sent back in `x-crossfade-deployment`.
    pub id: String,
    /// Relative weight (0 ..= 10000), e.g. 80 and 20.
    pub weight: u32,
    /// Gate addresses, `host:port`.
    #[serde(default)]
    pub workers: Vec<String>,
}

impl Default for Listen {
    fn default() -> Self {
        let parse = |s: &str| s.parse().expect("the default addresses are valid");
        Self {
            public: parse(DEFAULT_PUBLIC),
            admin: parse(DEFAULT_ADMIN),
            control: parse(DEFAULT_CONTROL),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_read_timeout: ProxySettings::default().body_read_timeout,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            max_concurrent_requests: ProxySettings::default().max_concurrent_requests,
            max_concurrent_per_client: ProxySettings::default().max_concurrent_per_client,
            min_body_rate: ProxySettings::default().min_body_rate,
            queue_max: ProxySettings::default().queue_max,
            queue_timeout: ProxySettings::default().queue_timeout,
            max_header_count: ProxySettings::default().max_header_count,
            max_header_bytes: ProxySettings::default().max_header_bytes,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        let proxy = ProxySettings::default();
        Self {
            connect_timeout: proxy.connect_timeout,
            response_header_timeout: proxy.response_header_timeout,
            idle_chunk_timeout: proxy.idle_chunk_timeout,
            pool_idle_timeout: proxy.pool_idle_timeout,
            max_attempts: proxy.max_attempts,
            ejection_base: proxy.ejection.base,
            ejection_max: proxy.ejection.max,
        }
    }
}

impl Config {
    /// The static table in its wire form (version 0: any coordinator table
    /// replaces it).
    pub fn routing_table(&self) -> v1::RoutingTable {
        v1::RoutingTable {
            version: 0,
            endpoints: self
                .endpoint
                .iter()
                .map(|e| v1::EndpointRoute {
                    name: e.name.clone(),
                    aliases: e.aliases.clone(),
                    created: 0,
                    deployments: e
                        .deployment
                        .iter()
                        .map(|d| v1::DeploymentRoute {
                            id: d.id.clone(),
                            weight: d.weight,
                            max_model_len: 0,
                            workers: d
                                .workers
                                .iter()
                                .map(|address| v1::WorkerRoute {
                                    address: address.clone(),
                                    worker_id: String::new(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// How the proxy behaves.
    pub fn proxy_settings(&self) -> ProxySettings {
        ProxySettings {
            max_body_bytes: self.limits.max_body_bytes,
            body_read_timeout: self.limits.body_read_timeout,
            response_header_timeout: self.upstream.response_header_timeout,
            idle_chunk_timeout: self.upstream.idle_chunk_timeout,
            max_attempts: self.upstream.max_attempts,
            max_concurrent_requests: self.limits.max_concurrent_requests,
            max_concurrent_per_client: self.limits.max_concurrent_per_client,
            min_body_rate: self.limits.min_body_rate,
            queue_max: self.limits.queue_max,
            queue_timeout: self.limits.queue_timeout,
            max_header_count: self.limits.max_header_count,
            max_header_bytes: self.limits.max_header_bytes,
            ejection: EjectionPolicy {
                base: self.upstream.ejection_base,
                max: self.upstream.ejection_max,
            },
            connect_timeout: self.upstream.connect_timeout,
            pool_idle_timeout: self.upstream.pool_idle_timeout,
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.log.validate("log");
        errors.extend(
            self.control_tls
                .validate("control_tls", &[("listen.control", self.listen.control)]),
        );
        let listen = [
            ("listen.public", self.listen.public),
            ("listen.admin", self.listen.admin),
            ("listen.control", self.listen.control),
        ];
        errors.extend(FieldError::distinct_listeners(&listen));
        errors.extend(FieldError::check_range(
            "limits.max_body_bytes",
            self.limits.max_body_bytes,
            1..=1 << 30,
        ));
        errors.extend(FieldError::check_duration(
            "limits.body_read_timeout",
            self.limits.body_read_timeout,
            Duration::from_secs(1)..=Duration::from_secs(600),
        ));
        errors.extend(
            self.control_tls
                .check_peers("coordinator.api", &self.coordinator.api),
        );
        errors.extend(FieldError::check_duration(
            "metrics.retired_series_grace",
            self.metrics.retired_series_grace,
            Duration::from_secs(1)..=Duration::from_secs(86_400),
        ));
        errors.extend(FieldError::check_range(
            "limits.h2_max_concurrent_streams",
            self.limits.h2_max_concurrent_streams,
            1..=10_000,
        ));
        errors.extend(FieldError::check_range(
            "limits.max_concurrent_requests",
            self.limits.max_concurrent_requests,
            1..=1_000_000,
        ));
        errors.extend(FieldError::check_range(
            "limits.max_concurrent_per_client",
            self.limits.max_concurrent_per_client,
            1..=1_000_000,
        ));
        errors.extend(FieldError::check_range(
            "limits.min_body_rate",
            self.limits.min_body_rate,
            0..=1 << 30,
        ));
        errors.extend(FieldError::check_range(
            "limits.queue_max",
            self.limits.queue_max,
            0..=1_000_000,
        ));
        errors.extend(FieldError::check_duration(
            "limits.queue_timeout",
            self.limits.queue_timeout,
            Duration::ZERO..=Duration::from_secs(600),
        ));
        errors.extend(FieldError::check_range(
            "limits.max_header_count",
            self.limits.max_header_count,
            1..=crossfade_common::http::MAX_HEADERS,
        ));
        errors.extend(FieldError::check_range(
            "limits.max_header_bytes",
            self.limits.max_header_bytes,
            1024..=crossfade_common::http::MAX_HEADER_BYTES,
        ));
        if self.public_tls.cert.is_some() != self.public_tls.key.is_some() {
            errors.push(FieldError::new(
                "public_tls",
                "cert and key go together: set both (PEM files), or neither for plain HTTP",
            ));
        }
        errors.extend(FieldError::check_range(
            "upstream.max_attempts",
            self.upstream.max_attempts,
            1..=10,
        ));
        for (key, value) in [
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
            ),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            (
                "upstream.response_header_timeout",
                self.upstream.response_header_timeout,
            ),
            (
                "upstream.idle_chunk_timeout",
                self.upstream.idle_chunk_timeout,
            ),
            ("upstream.ejection_base", self.upstream.ejection_base),
        ] {
            if value.is_zero() {
                errors.push(FieldError::new(key, "must be above 0s"));
            }
        }
        if self.upstream.ejection_max < self.upstream.ejection_base {
            errors.push(FieldError::new(
                "upstream.ejection_max",
                "must be at least upstream.ejection_base",
            ));
        }
        for (i, e) in self.endpoint.iter().enumerate() {
            for (j, d) in e.deployment.iter().enumerate() {
                errors.extend(FieldError::check_range(
                    &format!("endpoint[{i}].deployment[{j}].weight"),
                    d.weight,
                    0..=MAX_WEIGHT,
                ));
            }
        }
        if errors.is_empty()
            && let Err(e) = Table::build(&self.routing_table(), Source::Config, &Shared::default())
        {
            errors.push(FieldError::new("endpoint", e.to_string()));
        }
        errors
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crossfade_common::config::{Sources, load};

    use super::*;

    /// Loads `text`, with certificates named by the environment.
    fn load_str(text: &str) -> Result<Config, crossfade_common::ConfigError> {
        let path = std::env::temp_dir().join(format!("router-config-{}.toml", fastrand::u64(..)));
        std::fs::write(&path, text).unwrap();
        let env = ["CA", "CERT", "KEY"].map(|key| {
            (
                format!("CROSSFADE_CONTROL_TLS__{key}"),
                format!("/certs/{key}"),
            )
        });
        let result = load::<Config>(&Sources {
            file: Some(path.clone()),
            env: env.into(),
            ..Default::default()
        });
        std::fs::remove_file(path).unwrap();
        result
    }

    #[test]
    fn the_design_example_loads() {
        let config = load_str(
            r#"
            [listen]
            public = "0.0.0.0:8080"
            admin = "127.0.0.1:9401"
            control = "0.0.0.0:7001"

            [[endpoint]]
            name = "chat"
            aliases = ["Qwen/Qwen3-8B"]
            [[endpoint.deployment]]
            id = "v1"
            weight = 80
            workers = ["10.0.0.11:8000", "10.0.0.12:8000"]
            [[endpoint.deployment]]
            id = "v2"
            weight = 20
            workers = ["10.0.0.13:8000"]
            "#,
        )
        .unwrap();
        let table = config.routing_table();
        assert_eq!(
            table.endpoints[0].deployments[1].workers[0].address,
            "10.0.0.13:8000"
        );
        assert_eq!(
            config.upstream.max_attempts,
            ProxySettings::default().max_attempts
        );
    }

    #[test]
    fn the_shipped_example_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/config/router.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = load_str(&text).unwrap();
        assert_eq!(config.router_id, "router-a");
        assert_eq!(config.routing_table().endpoints[0].deployments.len(), 2);
    }

    #[test]
    fn a_bad_table_or_limit_is_named() {
        let err = load_str(
            "[[endpoint]]\nname = \"chat\"\n[[endpoint.deployment]]\nid = \"v1\"\nweight = 1\nworkers = [\"nohost\"]\n",
        )
        .unwrap_err();
        assert_eq!(err.keys(), ["endpoint"]);
        assert!(
            err.to_string()
                .contains("worker address `nohost` has no port"),
            "{err}"
        );

        let err =
            load_str("[upstream]\nmax_attempts = 0\n[limits]\nmax_body_bytes = 0\n").unwrap_err();
        assert_eq!(
            err.keys(),
            ["limits.max_body_bytes", "upstream.max_attempts"]
        );

        let err = load_str(
            "[limits]\nmax_header_count = 0\nmax_header_bytes = 10\nmax_concurrent_per_client = 0\n[public_tls]\ncert = \"c.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err.keys(),
            [
                "limits.max_concurrent_per_client",
                "limits.max_header_count",
                "limits.max_header_bytes",
                "public_tls"
            ]
        );

        let err = load_str("[listen]\nadmin = \"0.0.0.0:8080\"\n").unwrap_err();
        assert!(err.to_string().contains("is also listen.public"), "{err}");

        // Coordinators to tell of demand: host:port each (over mutual TLS,
        // anywhere).
        let err = load_str("[coordinator]\napi = [\"10.0.0.5:7000\", \"nohost\"]\n").unwrap_err();
        assert_eq!(err.keys(), ["coordinator.api[1]"]);
    }
}
