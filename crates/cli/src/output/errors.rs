//! Errors as the CLI prints them: `crossfade: ...` for people, one JSON
//! shape with `-o json`.

use super::watch::TimedOut;
use super::{Output, clean};

/// The shape of an error in `-o json` mode, on stderr:
/// `{"error": {"code": "NOT_FOUND", "message": "..."}}`. `code` is the
/// gRPC status name the coordinator answered with, `UNAVAILABLE` when it
/// could not be reached, `INVALID_ARGUMENT` for what the command line
/// itself got wrong, `DEADLINE_EXCEEDED` for `--timeout`, else `UNKNOWN`.
pub fn error_json(e: &anyhow::Error) -> String {
    let code = if let Some(rpc) = e.downcast_ref::<RpcError>() {
        rpc.code
    } else if e.downcast_ref::<TimedOut>().is_some() {
        "DEADLINE_EXCEEDED"
    } else if e.downcast_ref::<Unreachable>().is_some() {
        "UNAVAILABLE"
    } else if e.downcast_ref::<BadInput>().is_some() {
        "INVALID_ARGUMENT"
    } else {
        "UNKNOWN"
    };
    crossfade_proto::json::error(code, &format!("{e:#}")).to_string()
}

/// Prints an error on stderr: `crossfade: ...` for people, one JSON
/// object with `-o json` ([`error_json`]).
pub fn report_error(out: Output, e: &anyhow::Error) {
    match out {
        Output::Json => eprintln!("{}", error_json(e)),
        // A server's message may quote what a user sent.
        Output::Text => eprintln!("crossfade: {}", clean(&format!("{e:#}"))),
    }
}

/// An error the coordinator answered with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    /// Its gRPC status, by name (`NOT_FOUND`).
    pub code: &'static str,
    /// The coordinator's message (it names the field and its range).
    pub message: String,
}

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> Self {
        Self {
            code: crossfade_proto::json::code_name(status.code()),
            message: status.message().to_owned(),
        }
    }
}

/// The coordinator could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// What the command line asked for cannot be done as asked (a missing
/// file, a malformed flag), before any call.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_have_one_shape_with_the_code_of_their_cause() {
        let rpc: anyhow::Error =
            RpcError::from(tonic::Status::not_found("endpoint: no endpoint `x`")).into();
        let value: serde_json::Value = serde_json::from_str(&error_json(&rpc)).unwrap();
        assert_eq!(value["error"]["code"], "NOT_FOUND");
        assert_eq!(value["error"]["message"], "endpoint: no endpoint `x`");
        let wrapped =
            anyhow::Error::from(BadInput("reading the template t.toml".into())).context("promote");
        let value: serde_json::Value = serde_json::from_str(&error_json(&wrapped)).unwrap();
        assert_eq!(value["error"]["code"], "INVALID_ARGUMENT");
        assert_eq!(
            value["error"]["message"],
            "promote: reading the template t.toml"
        );
        let other: serde_json::Value =
            serde_json::from_str(&error_json(&anyhow::anyhow!("odd"))).unwrap();
        assert_eq!(other["error"]["code"], "UNKNOWN");
    }
}
