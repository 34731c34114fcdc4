//! The official `openai` Python client streams a chat completion from
//! `fake-vllm`, token by token: the fake speaks the API real clients use.
#![allow(clippy::unwrap_used)]

use crossfade_e2e::{openai_stream, python_for_test, start_fake_vllm, tokens};

#[test]
fn the_openai_client_streams_a_chat_completion_token_by_token() {
    let Some(python) = python_for_test() else {
        return;
    };
    let (_engine, addr) = start_fake_vllm(
        "org/model",
        &["chat"],
        &[("FAKE_VLLM_TOKENS_PER_SECOND", "20")],
    )
    .unwrap();

    let chunks = openai_stream(&python, &format!("http://{addr}/v1"), "chat").unwrap();
    let tokens = tokens(&chunks);
    assert_eq!(tokens.len(), 8, "one chunk per token: {chunks:#?}");
    let content: String = tokens.iter().filter_map(|c| c.content.as_deref()).collect();
    assert!(content.starts_with("[org/model as chat]"), "{content}");
    assert!(chunks.iter().all(|c| c.model == "chat"), "{chunks:#?}");
    assert_eq!(chunks.last().unwrap().usage, Some(8), "{chunks:#?}");

    // Token by token, not all at the end: at 20 tokens/s, eight tokens
    // arrive over about 350 ms after the first.
    let spread = tokens.last().unwrap().at - tokens[0].at;
    assert!(
        spread > 0.2,
        "chunks arrived within {spread:.3} s: {tokens:?}"
    );
}

/// The official client through the router, on each API it carries, and
/// plain HTTP on the routes the SDK has no method for. Prints one line per
/// call.
const THROUGH_THE_ROUTER: &str = r#"
import io, sys
import httpx, openai
base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
print("retrieve", client.models.retrieve("chat").id)
chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
print("chat", chat.model, chat.usage.completion_tokens)
chunks = [c for c in client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)]
print("chat-stream", len([c for c in chunks if c.choices and c.choices[0].delta.content]))
done = client.completions.create(model="chat", prompt="hi", max_tokens=2)
print("completion", done.model, done.usage.completion_tokens)
streamed = [c for c in client.completions.create(model="chat", prompt="hi", max_tokens=2, stream=True)]
print("completion-stream", len([c for c in streamed if c.choices and c.choices[0].text]))
embedded = client.embeddings.create(model="chat", input=["a b", "c"])
print("embeddings", len(embedded.data), len(embedded.data[0].embedding))
audio = io.BytesIO(b"RIFF" + bytes(96))
audio.name = "a.wav"
print("transcription", client.audio.transcriptions.create(model="chat", file=audio).text)
http = httpx.Client(base_url=base, timeout=30)
tokens = http.post("/tokenize", json={"prompt": "one two three"}).json()
print("tokenize", tokens["count"])
print("detokenize", http.post("/detokenize", json={"tokens": tokens["tokens"]}).status_code)
print("model", http.get("/v1/models/chat").json()["id"])
"#;

#[test]
fn the_openai_client_works_through_the_router_on_every_api_it_carries() {
    let Some(python) = python_for_test() else {
        return;
    };
    let (_engine, engine) = start_fake_vllm("org/model", &["chat"], &[]).unwrap();
    let dir = crossfade_e2e::TempDir::new().unwrap();
    let public = std::net::SocketAddr::from(([127, 0, 0, 1], crossfade_e2e::free_port().unwrap()));
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\npublic = \"{public}\"\nadmin = \"127.0.0.1:{}\"\ncontrol = \"127.0.0.1:{}\"\n\
             [control_tls]\ninsecure = true\n\
             [[endpoint]]\nname = \"chat\"\n[[endpoint.deployment]]\nid = \"v1\"\nweight = 1\nworkers = [\"{engine}\"]\n",
            crossfade_e2e::free_port().unwrap(),
            crossfade_e2e::free_port().unwrap(),
        ),
    )
    .unwrap();
    let mut command =
        std::process::Command::new(crossfade_e2e::binary("crossfade-router").unwrap());
    command.arg("--config").arg(&config).env("RUST_LOG", "warn");
    let _router = crossfade_e2e::Process::spawn("crossfade-router", command).unwrap();
    crossfade_e2e::wait_for_port(public, std::time::Duration::from_secs(20)).unwrap();

    let base = format!("http://{public}");
    let lines = crossfade_e2e::run_python(&python, THROUGH_THE_ROUTER, &[base.as_ref()]).unwrap();
    assert_eq!(
        lines,
        [
            "retrieve chat",
            "chat chat 3",
            "chat-stream 3",
            "completion chat 2",
            "completion-stream 2",
            "embeddings 2 8",
            "transcription [chat heard 100 bytes]",
            "tokenize 3",
            "detokenize 200",
            "model chat",
        ],
    );
}
