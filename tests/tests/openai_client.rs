//! The official `openai` Python client streams a chat completion from
//! `fake-vllm`, token by token: the fake speaks the API real clients use.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crossfade_e2e::{Process, binary, free_port, in_ci, python_with_openai, wait_for_port};

/// Streams one chat completion and prints, per chunk, the seconds since the
/// request was sent and the content delta, as JSON lines.
const CLIENT: &str = r#"
import json, sys, time
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=30)
start = time.monotonic()
stream = client.chat.completions.create(
    model="chat",
    messages=[{"role": "user", "content": "Say something."}],
    max_tokens=8,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    delta = chunk.choices[0].delta.content if chunk.choices else None
    usage = chunk.usage.completion_tokens if chunk.usage else None
    print(json.dumps({"t": time.monotonic() - start, "content": delta,
                      "model": chunk.model, "usage": usage}), flush=True)
"#;

#[test]
fn the_openai_client_streams_a_chat_completion_token_by_token() {
    let Some(python) = python_with_openai() else {
        assert!(
            !in_ci(),
            "CI must provide the openai package (.ci/run installs it)"
        );
        eprintln!("skipped: no Python with the `openai` package (run .ci/run, or set E2E_PYTHON)");
        return;
    };

    let port = free_port().unwrap();
    let mut engine = Command::new(binary("fake-vllm").unwrap());
    engine
        .args(["serve", "org/model", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--served-model-name", "chat"])
        .env("FAKE_VLLM_TOKENS_PER_SECOND", "20");
    let mut engine = Process::spawn("fake-vllm", engine).unwrap();
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(20),
    )
    .unwrap();
    engine.ensure_running().unwrap();

    let out = Command::new(python)
        .args(["-c", CLIENT, &format!("http://127.0.0.1:{port}/v1")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let chunks: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["content"].as_str())
        .collect();
    // vLLM's first chunk carries the role with empty content; the rest one token each.
    let is_token = |c: &&serde_json::Value| c["content"].as_str().is_some_and(|s| !s.is_empty());
    let tokens = chunks.iter().filter(is_token).count();
    assert_eq!(tokens, 8, "one chunk per token: {chunks:#?}");
    assert!(content.starts_with("[org/model as chat]"), "{content}");
    assert!(chunks.iter().all(|c| c["model"] == "chat"), "{chunks:#?}");
    assert_eq!(chunks.last().unwrap()["usage"], 8, "{chunks:#?}");

    // Token by token, not all at the end: at 20 tokens/s, eight tokens
    // arrive over about 350 ms after the first.
    let times: Vec<f64> = chunks
        .iter()
        .filter(is_token)
        .map(|c| c["t"].as_f64().unwrap())
        .collect();
    let spread = times.last().unwrap() - times.first().unwrap();
    assert!(
        spread > 0.2,
        "chunks arrived within {spread:.3} s: {times:?}"
    );
}
