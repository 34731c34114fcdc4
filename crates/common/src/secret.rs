//! A value that must never appear in logs, errors or API responses.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Wraps a secret (an API key, a token). `Debug`, `Display` and `Serialize`
/// all print `<redacted>`, so `--print-config`, a `{:?}` in a log line or a
/// JSON dump cannot leak it; only [`Secret::expose`] gives the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

/// What a secret prints as.
pub const REDACTED: &str = "<redacted>";

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The value itself. Call it only where the value is used, never to log it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug)]
    struct Keys {
        api_key: Secret<String>,
    }

    #[test]
    fn never_printed_but_still_read() {
        let keys: Keys = toml::from_str(r#"api_key = "sk-live-123""#).expect("valid toml");
        assert_eq!(keys.api_key.expose(), "sk-live-123");
        for shown in [
            format!("{keys:?}"),
            format!("{}", keys.api_key),
            toml::to_string(&keys).expect("serializable"),
            serde_json::to_string(&keys).expect("serializable"),
        ] {
            assert!(!shown.contains("sk-live-123"), "{shown}");
            assert!(shown.contains(REDACTED), "{shown}");
        }
    }
}
