//! `crossfade certs`: a private CA for a fleet and the certificates of its
//! members, each naming its role (`coordinator`, `router`, `agent`,
//! `operator`) in its subject alternative names, as the URI
//! `crossfade://role/ROLE`. Keys are written with mode 0600 and never
//! printed. Built on rcgen.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use crossfade_proto::tls::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// `crossfade certs ...`.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the fleet's CA: `DIR/ca.pem` and `DIR/ca.key` (0600).
    Init {
        /// Where the files go.
        #[arg(long, default_value = "crossfade-certs")]
        dir: PathBuf,
    },
    /// Issue a certificate signed by the CA in `DIR`: `DIR/NAME.pem` and
    /// `DIR/NAME.key` (0600).
    Issue {
        /// Where the CA is, and where the files go.
        #[arg(long, default_value = "crossfade-certs")]
        dir: PathBuf,
        /// What the holder may do: coordinator, router, agent or operator.
        #[arg(long, value_parser = str::parse::<Role>)]
        role: Role,
        /// The holder's name: the file names and a DNS name in the
        /// certificate (letters, digits, `-`, `.`).
        #[arg(long)]
        name: String,
        /// More names or IP addresses the holder answers on (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

/// Runs a `certs` command; prints the files written.
pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    let written = match command {
        CertsCommand::Init { dir } => init(&dir)?,
        CertsCommand::Issue {
            dir,
            role,
            name,
            sans,
        } => issue(&dir, role, &name, &sans)?,
    };
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Creates the CA in `dir`; refuses to overwrite one.
pub fn init(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if key_path.exists() {
        bail!(
            "{} exists: a fleet has one CA (remove it to start over)",
            key_path.display()
        );
    }
    let key = KeyPair::generate().context("generating the CA's key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "crossfade fleet CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(vec![cert_path, key_path])
}

/// Issues `name`'s certificate for `role`, signed by the CA in `dir`.
pub fn issue(dir: &Path, role: Role, name: &str, sans: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    if name.is_empty()
        || name.len() > 253
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        || name == "ca"
    {
        bail!("--name: 1 to 253 letters, digits, `-` and `.`, and not `ca`");
    }
    let ca_key = std::fs::read_to_string(dir.join("ca.key")).with_context(|| {
        format!(
            "reading the CA's key in {} (run `crossfade certs init`)",
            dir.display()
        )
    })?;
    let ca_cert = std::fs::read_to_string(dir.join("ca.pem"))
        .with_context(|| format!("reading {}", dir.join("ca.pem").display()))?;
    let ca_key = KeyPair::from_pem(&ca_key).context("the CA's key does not parse")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key)
        .context("the CA's certificate does not parse")?;

    let key = KeyPair::generate().context("generating the key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![
        SanType::URI(role.uri().try_into().context("the role URI")?),
        SanType::DnsName(name.try_into().context("--name as a DNS name")?),
    ];
    for san in sans {
        params.subject_alt_names.push(match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                SanType::DnsName(san.as_str().try_into().with_context(|| {
                    format!("--san {san}: neither an IP address nor a DNS name")
                })?)
            }
        });
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Every member both serves and calls: agents and routers serve the
    // coordinator, the coordinator calls them and serves operators.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_after = rcgen::date_time_ymd(2031, 1, 1);
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the certificate")?;
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(vec![cert_path, key_path])
}

/// A key: 0600 from its first byte (the project's private-file writer),
/// and never over an existing one.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    if path.exists() {
        bail!("{} exists: keys are never overwritten", path.display());
    }
    crossfade_common::files::write_private(path, contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use x509_parser::prelude::*;

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("crossfade-certs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_fleet_ca_issues_certificates_that_name_their_role() {
        let dir = temp_dir("issue");
        init(&dir).unwrap();
        assert!(init(&dir).is_err(), "a second CA over the first");
        issue(
            &dir,
            Role::Agent,
            "gpu-07",
            &["10.0.0.17".into(), "gpu-07.lan".into()],
        )
        .unwrap();
        for key in ["ca.key", "gpu-07.key"] {
            let mode = std::fs::metadata(dir.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}: {mode:o}");
        }
        let ca_pem = std::fs::read(dir.join("ca.pem")).unwrap();
        let (_, ca_pem) = parse_x509_pem(&ca_pem).unwrap();
        let ca = ca_pem.parse_x509().unwrap();
        assert!(ca.is_ca());
        let pem = std::fs::read(dir.join("gpu-07.pem")).unwrap();
        let (_, pem) = parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        // Signed by the fleet's CA.
        cert.verify_signature(Some(ca.public_key())).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "uri:crossfade://role/agent",
                "dns:gpu-07",
                "ip:[10, 0, 0, 17]",
                "dns:gpu-07.lan"
            ]
        );
        // Keys are never overwritten, and a name cannot climb out of the
        // directory.
        assert!(issue(&dir, Role::Agent, "gpu-07", &[]).is_err());
        assert!(issue(&dir, Role::Operator, "../x", &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
