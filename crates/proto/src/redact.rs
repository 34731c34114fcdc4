//! `Debug` for messages that may carry a secret.
//!
//! The generated code derives `Debug` for everything else. Here a secret
//! `EnvVar` shows its name and how long its value is, never the value, and
//! the bare `source` oneof never shows a literal value (it does not know
//! whether its parent is secret).

use std::fmt;

use crate::v1::EnvVar;
use crate::v1::env_var::Source;

impl fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("EnvVar");
        s.field("name", &self.name);
        match &self.source {
            Some(Source::Value(v)) if !self.secret => s.field("value", v),
            Some(Source::Value(v)) => s.field("value", &Redacted(v.len())),
            Some(Source::FromCoordinatorEnv(name)) => s.field("from_coordinator_env", name),
            None => s.field("source", &None::<()>),
        };
        s.field("secret", &self.secret)
            .field("redacted", &self.redacted)
            .finish()
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Value(v) => f.debug_tuple("Value").field(&Redacted(v.len())).finish(),
            Source::FromCoordinatorEnv(name) => {
                f.debug_tuple("FromCoordinatorEnv").field(name).finish()
            }
        }
    }
}

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, {} bytes>", self.0)
    }
}
