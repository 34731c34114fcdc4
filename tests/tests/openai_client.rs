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
