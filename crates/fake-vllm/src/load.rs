//! The model "load": the startup delay during which vLLM's port is closed,
//! and the ways a load fails.

use crate::args::Config;
use crate::faults::Fault;

/// Models under this prefix do not exist, like a mistyped Hugging Face id.
pub const MISSING_MODEL_PREFIX: &str = "does-not-exist/";

/// Why the model did not load; the binary exits with status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// vLLM's wording for a model id that resolves nowhere.
    #[error(
        "OSError: {0} is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'"
    )]
    ModelNotFound(String),
    #[error(
        "EngineCore failed to start: worker process died while loading model weights (fake-vllm fault exit-during-load)"
    )]
    ExitDuringLoad,
}

/// Spends `config.load_time` "loading" the model, failing as configured.
/// Binding the port is the caller's business, after this returns `Ok`.
pub async fn load(config: &Config) -> Result<(), LoadError> {
    tracing::info!(model = %config.model, "Loading model weights...");
    if config.fault == Fault::ExitDuringLoad {
        tokio::time::sleep(config.load_time / 2).await;
        return Err(LoadError::ExitDuringLoad);
    }
    tokio::time::sleep(config.load_time).await;
    if config.model.starts_with(MISSING_MODEL_PREFIX) {
        return Err(LoadError::ModelNotFound(config.model.clone()));
    }
    tracing::info!(
        "Model loading took {}",
        humantime::format_duration(config.load_time)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn load_takes_its_time_and_fails_as_configured() {
        let mut config = Config::new("org/m");
        config.load_time = Duration::from_secs(2);
        let start = Instant::now();
        assert_eq!(load(&config).await, Ok(()));
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        config.fault = Fault::ExitDuringLoad;
        let start = Instant::now();
        assert_eq!(load(&config).await, Err(LoadError::ExitDuringLoad));
        assert_eq!(start.elapsed(), Duration::from_secs(1));

        let mut config = Config::new("does-not-exist/model");
        config.load_time = Duration::from_secs(1);
        let err = load(&config).await.expect_err("missing model");
        assert!(
            err.to_string()
                .contains("does-not-exist/model is not a local folder")
        );
    }
}
