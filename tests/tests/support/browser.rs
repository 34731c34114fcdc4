//! A headless Chromium (Debian's `chromium`) driven over the DevTools
//! protocol: open a page, evaluate JavaScript in it, take a screenshot.
//! The browser is killed when the [`Browser`] is dropped.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

use crossfade_e2e::{TempDir, in_ci};

/// The browser, or why there is none: `None` (a skip, said so) unless CI
/// or `CROSSFADE_REQUIRE_BROWSER=1` asks for one.
pub fn chromium() -> Option<String> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return Some(name.to_owned());
        }
    }
    assert!(
        !in_ci() && std::env::var("CROSSFADE_REQUIRE_BROWSER").as_deref() != Ok("1"),
        "a browser is required here (apt-get install chromium)"
    );
    eprintln!("SKIPPED: no chromium (apt-get install chromium)");
    None
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless browser with one page.
pub struct Browser {
    child: Child,
    page: Socket,
    next_id: u64,
    _profile: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts `program` headless, with a page on `url`.
    pub async fn open(program: &str, url: &str) -> anyhow::Result<Self> {
        let profile = TempDir::new()?;
        let mut child = Command::new(program)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1280,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().context("its stderr")?;
        let (found, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ws://").nth(1) {
                    let _ = found.send(rest.to_owned());
                }
            }
        });
        let Ok(address) = lines.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            bail!("{program} did not say where its DevTools listen within 30 s");
        };
        let host = address.split('/').next().unwrap_or_default().to_owned();
        // A new page on `url`, through the HTTP endpoint.
        let answer = http(&host, &format!("PUT /json/new?{url} HTTP/1.1")).await?;
        let target: Value =
            serde_json::from_str(&answer).with_context(|| format!("DevTools' answer: {answer}"))?;
        let ws = target["webSocketDebuggerUrl"]
            .as_str()
            .context("no webSocketDebuggerUrl")?;
        let (page, _) = tokio_tungstenite::connect_async(ws).await?;
        Ok(Self {
            child,
            page,
            next_id: 0,
            _profile: profile,
        })
    }

    /// Calls a DevTools method on the page; its result.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params });
        self.page.send(Message::text(request.to_string())).await?;
        let read = async {
            while let Some(message) = self.page.next().await {
                let Message::Text(text) = message? else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text)?;
                if value["id"] == id {
                    if let Some(error) = value.get("error") {
                        bail!("{method}: {error}");
                    }
                    return Ok(value["result"].clone());
                }
            }
            bail!("the browser closed the page's socket")
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .with_context(|| format!("{method}: no answer within 20 s"))?
    }

    /// Evaluates `expression` in the page; its value (JSON).
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("{expression}: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// The page as a PNG.
    pub async fn screenshot(&mut self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        let result = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        Ok(base64::engine::general_purpose::STANDARD
            .decode(result["data"].as_str().context("no data")?)?)
    }
}

/// One HTTP/1.1 request to `host` (`127.0.0.1:PORT`); the body of the
/// answer (DevTools keeps the connection open: read to its length).
async fn http(host: &str, request_line: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("{request_line}\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let read = async {
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                bail!("DevTools closed the connection");
            }
            answer.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&answer).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .context("no Content-Length")?;
                if body.len() >= length {
                    return Ok(body.to_owned());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await?
}
