//! API keys of the public port.
//!
//! A key is `cfk_ID_SECRET`: `ID` (12 hex digits) finds its record, and
//! only a salted SHA-256 of `SECRET` (256 random bits) is stored, so the
//! file (written by `crossfade keys`) gives no key away: it is readable
//! (0644) by the router's unprivileged user. A request shows its key
//! as `Authorization: Bearer KEY` (the OpenAI SDKs) or `api-key: KEY`
//! (Azure OpenAI's clients); the hashes are compared in constant time.
//! Each key may carry its own concurrency limit and the endpoints it may
//! call.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// What every key starts with.
pub const PREFIX: &str = "cfk_";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;
const SALT_BYTES: usize = 16;

/// The keys file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Every key, revoked ones included.
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyRecord>,
}

/// One key, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The key's public part (12 hex digits).
    pub id: String,
    /// Who or what holds it.
    pub name: String,
    /// Salt of the hash (hex).
    pub salt: String,
    /// SHA-256 of the salt and the secret (hex).
    pub sha256: String,
    /// When it was made (RFC 3339).
    pub created: String,
    /// Refused from now on.
    #[serde(default)]
    pub revoked: bool,
    /// Its requests in flight at once; 0: the router's per-client limit.
    #[serde(default)]
    pub max_concurrent: u32,
    /// Endpoints it may call; every endpoint when empty.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

impl KeyFile {
    /// Reads `path`; a missing file holds no key.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces `path` atomically; mode 0644 (hashes only).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt as _;
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        let text =
            format!("# crossfade API keys: hashes only. Written by `crossfade keys`.\n{text}");
        crossfade_common::files::write_private(path, text.as_bytes())
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Makes a key for `name`: its record is added, the key itself is
    /// returned (and stored nowhere).
    pub fn add(
        &mut self,
        name: &str,
        max_concurrent: u32,
        endpoints: Vec<String>,
        created: String,
    ) -> Result<String, String> {
        let random = |n: usize| {
            let mut bytes = vec![0; n];
            getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
            Ok::<_, String>(bytes)
        };
        let id = crossfade_common::files::hex(&random(ID_BYTES)?);
        if self.keys.iter().any(|k| k.id == id) {
            return Err("a key id repeated; try again".into());
        }
        let secret = crossfade_common::files::hex(&random(SECRET_BYTES)?);
        let salt = random(SALT_BYTES)?;
        self.keys.push(KeyRecord {
            id: id.clone(),
            name: name.to_owned(),
            salt: crossfade_common::files::hex(&salt),
            sha256: crossfade_common::files::hex(&digest(&salt, secret.as_bytes())),
            created,
            revoked: false,
            max_concurrent,
            endpoints,
        });
        Ok(format!("{PREFIX}{id}_{secret}"))
    }

    /// Revokes the keys whose id or name is `which`; how many.
    pub fn revoke(&mut self, which: &str) -> usize {
        let mut revoked = 0;
        for key in &mut self.keys {
            if (key.id == which || key.name == which) && !key.revoked {
                key.revoked = true;
                revoked += 1;
            }
        }
        revoked
    }
}

fn digest(salt: &[u8], secret: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(salt);
    hash.update(secret);
    hash.finalize().into()
}

/// A key that passed: what limits it carries.
#[derive(Debug)]
pub struct Key {
    /// Its id (the client's name in limits and logs).
    pub id: Arc<str>,
    /// Its concurrency limit; 0: the router's per-client limit.
    pub max_concurrent: u32,
    /// Endpoints it may call; `None`: all.
    pub endpoints: Option<Vec<String>>,
    salt: Vec<u8>,
    hash: [u8; 32],
    revoked: bool,
}

impl Key {
    /// Whether it may call `endpoint`.
    pub fn allows(&self, endpoint: &str) -> bool {
        self.endpoints
            .as_ref()
            .is_none_or(|list| list.iter().any(|e| e == endpoint))
    }
}

/// Why a request's key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key in the request.
    Missing,
    /// No such key, or a wrong secret.
    Wrong,
    /// A key that was revoked.
    Revoked,
}

/// The keys a router checks, ready for lookups.
#[derive(Debug, Default)]
pub struct Keys(HashMap<String, Arc<Key>>);

impl Keys {
    /// From a keys file; a malformed record is an error naming it.
    pub fn new(file: &KeyFile) -> Result<Self, String> {
        let mut keys = HashMap::new();
        for (i, record) in file.keys.iter().enumerate() {
            let salt = crossfade_common::files::unhex(&record.salt);
            let hash = crossfade_common::files::unhex(&record.sha256)
                .and_then(|h| <[u8; 32]>::try_from(h).ok());
            let (Some(salt), Some(hash)) = (salt, hash) else {
                return Err(format!(
                    "key[{i}] ({}): salt or sha256 is not hex",
                    record.id
                ));
            };
            let key = Key {
                id: record.id.as_str().into(),
                max_concurrent: record.max_concurrent,
                endpoints: (!record.endpoints.is_empty()).then(|| record.endpoints.clone()),
                salt,
                hash,
                revoked: record.revoked,
            };
            keys.insert(record.id.clone(), Arc::new(key));
        }
        Ok(Self(keys))
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The key a request shows, checked.
    pub fn check(&self, headers: &HeaderMap) -> Result<Arc<Key>, Refusal> {
        let shown = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .ok_or(Refusal::Missing)?;
        let (id, secret) = shown
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .ok_or(Refusal::Wrong)?;
        let found = self.0.get(id);
        // The same work whether the id exists or not.
        let (salt, expected) = found.map_or((&[][..], [0; 32]), |k| (&k.salt[..], k.hash));
        let matches: bool = digest(salt, secret.as_bytes()).ct_eq(&expected).into();
        match found {
            Some(key) if matches && key.revoked => Err(Refusal::Revoked),
            Some(key) if matches => Ok(Arc::clone(key)),
            _ => Err(Refusal::Wrong),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::HeaderName::try_from(name).unwrap(),
            value.parse().unwrap(),
        );
        headers
    }

    #[test]
    fn a_key_is_checked_against_its_salted_hash_and_can_be_revoked() {
        let mut file = KeyFile::default();
        let key = file
            .add("ci", 8, vec!["chat".into()], "2026-11-30T00:00:00Z".into())
            .unwrap();
        let other = file
            .add("laptop", 0, vec![], "2026-11-30T00:00:00Z".into())
            .unwrap();
        // The file holds no secret.
        let stored = toml::to_string(&file).unwrap();
        assert!(!stored.contains(key.rsplit('_').next().unwrap()));

        let keys = Keys::new(&file).unwrap();
        let found = keys
            .check(&headers("authorization", &format!("Bearer {key}")))
            .unwrap();
        assert_eq!(found.max_concurrent, 8);
        assert!(found.allows("chat") && !found.allows("other"));
        let found = keys.check(&headers("api-key", &other)).unwrap();
        assert!(found.allows("anything"));

        assert_eq!(keys.check(&HeaderMap::new()).unwrap_err(), Refusal::Missing);
        let last = if key.ends_with('0') { '1' } else { '0' };
        let wrong = format!("{}{last}", &key[..key.len() - 1]);
        for shown in [wrong.as_str(), "cfk_nope_x", "sk-abc", ""] {
            assert_eq!(
                keys.check(&headers("authorization", &format!("Bearer {shown}")))
                    .unwrap_err(),
                Refusal::Wrong,
                "{shown}"
            );
        }

        assert_eq!(file.revoke("ci"), 1);
        let keys = Keys::new(&file).unwrap();
        assert_eq!(
            keys.check(&headers("authorization", &format!("Bearer {key}")))
                .unwrap_err(),
            Refusal::Revoked
        );
        assert!(keys.check(&headers("api-key", &other)).is_ok());
    }

    #[test]
    fn the_file_round_trips_and_a_missing_one_is_empty() {
        let dir = std::env::temp_dir().join(format!("crossfade-keys-{}", std::process::id()));
        let path = dir.join("keys.toml");
        assert_eq!(KeyFile::load(&path).unwrap(), KeyFile::default());
        let mut file = KeyFile::default();
        file.add("ci", 0, vec![], "2026-11-30T00:00:00Z".into())
            .unwrap();
        file.save(&path).unwrap();
        assert_eq!(KeyFile::load(&path).unwrap(), file);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
