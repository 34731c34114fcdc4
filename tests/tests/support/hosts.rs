//! Hosts as containers on a private Docker network: an image holding the
//! workspace's programs, the network, and containers that are removed when
//! their guards drop, also when a test fails. Nothing is pulled (these
//! machines have no registry): the image is the binaries, the libraries
//! `ldd` names for them, and the files a test gives, loaded with
//! `docker import`.

use crossfade_e2e::docker;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The label every container and network made here carries, so that a
/// person can find what a killed test run left behind.
pub const LABEL: &str = "io.crossfade.e2e=hosts";

/// Removes the containers, networks and images labelled [`LABEL`] whose
/// name carries the id of a process that no longer runs ([`crossfade_e2e::unique_name`]):
/// what a run killed before its guards could drop left behind. Those of
/// runs still going are theirs.
pub fn remove_leftovers() {
    let dead = |name: &str| {
        name.split(['-', ':'])
            .find_map(|part| part.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let filter = format!("label={LABEL}");
    let list = |args: &[&str]| -> Vec<String> {
        docker(args)
            .map(|out| out.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    for name in list(&["ps", "--all", "--filter", &filter, "--format", "{{.Names}}"]) {
        if dead(&name) {
            let _ = docker(&["rm", "--force", "--volumes", &name]);
        }
    }
    for name in list(&[
        "network",
        "ls",
        "--filter",
        &filter,
        "--format",
        "{{.Name}}",
    ]) {
        if dead(&name) {
            let _ = docker(&["network", "rm", &name]);
        }
    }
    let images = list(&[
        "images",
        "--filter",
        &filter,
        "--format",
        "{{.Repository}}:{{.Tag}}",
    ]);
    for tag in images {
        if dead(&tag) {
            let _ = docker(&["rmi", "--force", &tag]);
        }
    }
}

/// A local image; removed when dropped.
pub struct Image(pub String);

impl Image {
    /// Builds `tag` in `dir`: each of `binaries` at `/NAME`, the libraries
    /// and loader they link at their own paths, `files` (absolute path in
    /// the image, contents) and an empty `/tmp`; `changes` are Dockerfile
    /// instructions for `docker import --change`.
    pub fn build(
        dir: &Path,
        tag: &str,
        binaries: &[PathBuf],
        files: &[(String, String)],
        changes: &[&str],
    ) -> Self {
        let root = dir.join("rootfs");
        let mut libraries = BTreeSet::new();
        for binary in binaries {
            let name = binary.file_name().unwrap();
            std::fs::create_dir_all(&root).unwrap();
            std::fs::copy(binary, root.join(name)).unwrap();
            let ldd = Command::new("ldd").arg(binary).output().unwrap();
            assert!(ldd.status.success(), "ldd {}", binary.display());
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)".
            for line in String::from_utf8_lossy(&ldd.stdout).lines() {
                if let Some(path) = line.split_whitespace().find(|word| word.starts_with('/')) {
                    libraries.insert(PathBuf::from(path));
                }
            }
        }
        for library in &libraries {
            let to = root.join(library.strip_prefix("/").unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(library, &to).unwrap();
        }
        for (path, text) in files {
            let to = root.join(path.strip_prefix('/').unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::write(&to, text).unwrap();
        }
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let archive = dir.join("rootfs.tar");
        let tarred = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&archive)
            .arg(".")
            .status()
            .unwrap();
        assert!(tarred.success(), "tar of the image's files");
        // The binaries are copies: the image holds what it needs now.
        let _ = std::fs::remove_dir_all(&root);
        let mut import = vec!["import"];
        for change in changes {
            import.extend(["--change", change]);
        }
        import.extend([archive.to_str().unwrap(), tag]);
        let imported = docker(&import);
        let _ = std::fs::remove_file(&archive);
        imported.unwrap();
        Self(tag.to_owned())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}

/// A user-defined bridge network; removed when dropped (after the
/// containers on it, which must be dropped first).
pub struct Network(pub String);

impl Network {
    pub fn create(name: &str) -> Self {
        docker(&["network", "create", "--label", LABEL, name]).unwrap();
        Self(name.to_owned())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.0]);
    }
}

/// How to run one container.
pub struct Run<'a> {
    /// Its name on the network (a network alias), the same in every run:
    /// configurations can name their peers.
    pub alias: &'a str,
    /// Container ports published on 127.0.0.1, on ports Docker picks.
    pub publish: &'a [u16],
    pub env: &'a [(&'a str, &'a str)],
    pub command: &'a [&'a str],
}

/// A running container; removed (with SIGKILL) when dropped.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker run` of `image` as `name`, on `network` only.
    pub fn run(name: &str, network: &Network, image: &Image, run: &Run<'_>) -> Self {
        let mut args: Vec<String> = [
            "run",
            "--detach",
            "--name",
            name,
            "--label",
            LABEL,
            "--network",
            &network.0,
            "--network-alias",
            run.alias,
            "--hostname",
            run.alias,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for port in run.publish {
            args.push("--publish".into());
            args.push(format!("127.0.0.1::{port}"));
        }
        for (key, value) in run.env {
            args.push("--env".into());
            args.push(format!("{key}={value}"));
        }
        args.push(image.0.clone());
        args.extend(run.command.iter().map(|s| (*s).to_owned()));
        // The guard first, so that a failed start leaves nothing behind.
        let container = Self { name: name.into() };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args).unwrap();
        container
    }

    /// The address on 127.0.0.1 that Docker published `port` at.
    pub fn published(&self, port: u16) -> SocketAddr {
        let out = docker(&["port", &self.name, &format!("{port}/tcp")]).unwrap();
        // One line per address family; ours is 127.0.0.1 only.
        out.lines()
            .find_map(|line| line.trim().parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("{}: port {port} not published: {out:?}", self.name))
    }

    /// Cuts it off `network`: its address and name leave the network, and
    /// its connections to the others go silent (no reset is sent).
    pub fn disconnect(&self, network: &Network) {
        docker(&["network", "disconnect", &network.0, &self.name]).unwrap();
    }

    /// SIGKILL to every process in it: the host is gone.
    pub fn kill(&self) {
        docker(&["kill", &self.name]).unwrap();
    }

    /// The last `lines` lines of its output.
    pub fn logs(&self, lines: usize) -> String {
        match Command::new("timeout")
            .args([
                "30",
                "docker",
                "logs",
                "--tail",
                &lines.to_string(),
                &self.name,
            ])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("docker logs: {e}"),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "--force", "--volumes", &self.name]);
    }
}
