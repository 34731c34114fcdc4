//! Environment variables a template may not set on the engine: those that
//! change which code a program loads or runs, and those that choose the
//! GPUs (the agent owns the devices it was given). One list, checked by the
//! coordinator when a template is promoted and by the agent on every
//! `Apply`, so a caller that reaches an agent directly gets no further.

/// Exact names the agent owns, and why.
const OWNED: &[(&str, &str)] = &[
    (
        "CUDA_VISIBLE_DEVICES",
        "the agent gives the engine its own GPUs ([engine] cuda_visible_devices)",
    ),
    (
        "NVIDIA_VISIBLE_DEVICES",
        "the agent owns the GPUs it was given",
    ),
    (
        "HIP_VISIBLE_DEVICES",
        "the agent owns the GPUs it was given",
    ),
    (
        "ROCR_VISIBLE_DEVICES",
        "the agent owns the GPUs it was given",
    ),
    ("GPU_DEVICE_ORDINAL", "the agent owns the GPUs it was given"),
    ("CUDA_DEVICE_ORDER", "the agent owns the GPUs it was given"),
    ("PATH", "it chooses which programs run"),
    ("PYTHONPATH", "it chooses which Python code loads"),
    ("PYTHONHOME", "it chooses which Python runs"),
    ("PYTHONSTARTUP", "it runs code at start"),
    ("PYTHONUSERBASE", "it chooses which Python code loads"),
    ("PYTHONEXECUTABLE", "it chooses which Python runs"),
    ("PYTHONBREAKPOINT", "it runs code of the caller's choosing"),
    ("BASH_ENV", "it runs code at start"),
    ("ENV", "it runs code at start"),
    ("SHELLOPTS", "it changes how shells run"),
    ("IFS", "it changes how shells run"),
    ("NODE_OPTIONS", "it runs code at start"),
    ("PERL5OPT", "it runs code at start"),
    (
        "VLLM_HOST_IP",
        "the engine listens on loopback behind the agent's gate",
    ),
    ("VLLM_PORT", "the agent picks the engine's ports"),
];

/// Prefixes the agent owns, and why.
const OWNED_PREFIXES: &[(&str, &str)] = &[
    (
        "LD_",
        "it changes which libraries load (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT)",
    ),
    ("DYLD_", "it changes which libraries load"),
    ("GCONV_", "it changes which libraries load"),
    ("MALLOC_", "it changes how memory is allocated"),
];

/// Why a template may not set `name`, or `None` when it may.
pub fn owned(name: &str) -> Option<&'static str> {
    OWNED
        .iter()
        .find(|(owned, _)| *owned == name)
        .or_else(|| {
            OWNED_PREFIXES
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix))
        })
        .map(|(_, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaders_devices_and_start_up_code_are_the_agents() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES",
            "PYTHONPATH",
            "PATH",
            "BASH_ENV",
        ] {
            assert!(owned(name).is_some(), "{name}");
        }
        for name in [
            "HF_TOKEN",
            "VLLM_LOGGING_LEVEL",
            "HF_HOME",
            "OMP_NUM_THREADS",
            "LANG",
        ] {
            assert_eq!(owned(name), None, "{name}");
        }
    }
}
