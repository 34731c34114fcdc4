//! How the CLI reaches the coordinator: its address and the operator's
//! certificate, from flags, then `CROSSFADE_*` variables, then the user's
//! config file (`$XDG_CONFIG_HOME/crossfade/cli.toml`, else
//! `~/.config/crossfade/cli.toml`), then the default (plain text to
//! 127.0.0.1:7000).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use crossfade_proto::tls::{Control, Role};
use crossfade_proto::v1::coordinator_client::CoordinatorClient;
use serde::Deserialize;
use tonic::transport::Channel;

/// The coordinator's address when nothing names one.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7000";

/// Flags (and variables) that say how to reach the coordinator.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnectArgs {
    /// The coordinator's API [default: `coordinator` in the config file,
    /// else http://127.0.0.1:7000].
    #[arg(long, env = "CROSSFADE_COORDINATOR", global = true)]
    pub coordinator: Option<String>,
    /// The fleet CA's certificate (PEM), for mutual TLS.
    #[arg(long, env = "CROSSFADE_CA", value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// An operator's certificate (PEM), from `crossfade certs issue --role
    /// operator`.
    #[arg(long, env = "CROSSFADE_CERT", value_name = "FILE", global = true)]
    pub cert: Option<PathBuf>,
    /// The operator certificate's key (PEM).
    #[arg(long, env = "CROSSFADE_KEY", value_name = "FILE", global = true)]
    pub key: Option<PathBuf>,
}

/// The user's config file: the same four settings; relative paths are
/// read from the file's directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    coordinator: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// Where the user's config file is, if a home is known.
fn config_path(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = var("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(base.join("crossfade").join("cli.toml"))
}

impl ConnectArgs {
    /// Fills what flags and variables left out from the config file at
    /// `path` (if it exists).
    fn with_file(mut self, path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path.filter(|p| p.is_file()) else {
            return Ok(self);
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: FileConfig =
            toml::from_str(&text).with_context(|| format!("{} does not parse", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let relative = |p: Option<PathBuf>| p.map(|p| dir.join(p));
        self.coordinator = self.coordinator.or(file.coordinator);
        self.ca = self.ca.or(relative(file.ca));
        self.cert = self.cert.or(relative(file.cert));
        self.key = self.key.or(relative(file.key));
        Ok(self)
    }

    /// The coordinator's address and how to secure the call.
    fn resolve(self) -> anyhow::Result<(String, Control)> {
        let url = self
            .coordinator
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_owned());
        let control = match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => {
                if url.starts_with("https://") {
                    bail!(
                        "{url}: mutual TLS needs --ca, --cert and --key (or CROSSFADE_CA, CROSSFADE_CERT and CROSSFADE_KEY)"
                    );
                }
                Control::Insecure { remote: true }
            }
            (Some(ca), Some(cert), Some(key)) => Control::mutual(Role::Operator, ca, cert, key)?,
            _ => {
                let missing: Vec<&str> = [
                    ("--ca", &self.ca),
                    ("--cert", &self.cert),
                    ("--key", &self.key),
                ]
                .into_iter()
                .filter(|(_, v)| v.is_none())
                .map(|(flag, _)| flag)
                .collect();
                bail!(
                    "--ca, --cert and --key go together; missing: {}",
                    missing.join(", ")
                );
            }
        };
        Ok((url, control))
    }
}

/// Connects to the coordinator as `args` (then the user's config file) say.
pub async fn connect(args: ConnectArgs) -> anyhow::Result<CoordinatorClient<Channel>> {
    let path = config_path(|name| std::env::var(name).ok());
    let (url, control) = args.with_file(path.as_deref())?.resolve()?;
    dial(&url, &control).await
}

/// The URL of the leader at `leader` (`host:port`), in the scheme of the
/// coordinator `args` (then the user's config file) name.
pub fn leader_url(args: &ConnectArgs, leader: &str) -> String {
    let path = config_path(|name| std::env::var(name).ok());
    let https = args
        .clone()
        .with_file(path.as_deref())
        .ok()
        .and_then(|a| a.coordinator)
        .is_some_and(|url| url.starts_with("https://"));
    format!("{}://{leader}", if https { "https" } else { "http" })
}

/// Connects to the coordinator at `url`, secured as `control` says.
pub async fn dial(url: &str, control: &Control) -> anyhow::Result<CoordinatorClient<Channel>> {
    let endpoint = Control::endpoint(url)
        .with_context(|| format!("--coordinator: `{url}` is not a URL"))?
        .connect_timeout(Duration::from_secs(3));
    let channel = control
        .connect(&endpoint, Role::Coordinator)
        .await
        .map_err(|e| {
            crate::output::Unreachable(format!(
                "cannot reach the coordinator at {url} (set --coordinator or CROSSFADE_COORDINATOR): {e:#}"
            ))
        })?;
    Ok(CoordinatorClient::new(channel))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_fills_only_what_flags_left_out_and_reads_paths_from_its_directory() {
        let dir = std::env::temp_dir().join(format!("crossfade-cli-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cli.toml");
        std::fs::write(
            &path,
            "coordinator = \"https://coord:7000\"\nca = \"ca.pem\"\ncert = \"/abs/op.pem\"\nkey = \"op.key\"\n",
        )
        .unwrap();
        let given = ConnectArgs {
            key: Some("/mine.key".into()),
            ..ConnectArgs::default()
        };
        let merged = given.with_file(Some(&path)).unwrap();
        assert_eq!(merged.coordinator.as_deref(), Some("https://coord:7000"));
        assert_eq!(merged.ca, Some(dir.join("ca.pem")));
        assert_eq!(merged.cert, Some(PathBuf::from("/abs/op.pem")));
        assert_eq!(merged.key, Some(PathBuf::from("/mine.key")));

        std::fs::write(&path, "coordinatr = \"x\"\n").unwrap();
        let error = ConnectArgs::default().with_file(Some(&path)).unwrap_err();
        assert!(format!("{error:#}").contains("coordinatr"), "{error:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn certificates_go_together_and_https_needs_them() {
        let partial = ConnectArgs {
            ca: Some("ca.pem".into()),
            ..ConnectArgs::default()
        };
        let error = partial.resolve().unwrap_err().to_string();
        assert!(error.ends_with("missing: --cert, --key"), "{error}");
        let https = ConnectArgs {
            coordinator: Some("https://coord:7000".into()),
            ..ConnectArgs::default()
        };
        assert!(
            https
                .resolve()
                .unwrap_err()
                .to_string()
                .contains("--ca, --cert and --key")
        );
        let (url, control) = ConnectArgs::default().resolve().unwrap();
        assert_eq!(url, DEFAULT_COORDINATOR);
        assert!(control.is_insecure());
    }

    #[test]
    fn the_config_file_lives_under_the_xdg_directory_else_home() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            config_path(env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/crossfade/cli.toml"))
        );
        assert_eq!(
            config_path(env(&[("XDG_CONFIG_HOME", ""), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.config/crossfade/cli.toml"))
        );
        assert_eq!(config_path(env(&[])), None);
    }
}
