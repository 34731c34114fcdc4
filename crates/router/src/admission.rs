//! What a request passes before it may take one of the router's slots:
//! header limits, its API key (when keys are configured), its client's
//! concurrency limit (per key, else per address), and its body, read
//! within a time bound and at a minimum rate.
//!
//! A client that opens many connections, each with many streams that
//! trickle their bodies in, holds only its own client's slots: the
//! router-wide slot is taken after the body has arrived.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, header};
use http_body::Body;
use http_body_util::BodyExt as _;
use tokio::time::Instant;

use crate::error::RouteError;
use crate::keys::{Key, Keys, Refusal};
use crate::proxy::{BoxError, ProxySettings};
use crate::tally::Tally;

/// Who a request comes from, for its concurrency limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Client {
    Key(Arc<str>),
    Address(IpAddr),
}

/// One request's place in its client's count, given back when dropped
/// (with the response's last byte).
#[derive(Debug)]
pub struct ClientSlot {
    clients: Arc<Tally<Client>>,
    client: Client,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.clients.remove(&self.client);
    }
}

/// A request that passed: its key (if keys are configured) and its slot.
#[derive(Debug)]
pub struct Admitted {
    /// The key it showed.
    pub key: Option<Arc<Key>>,
    /// Its place in its client's count.
    pub slot: ClientSlot,
}

/// The checks, with the keys in force (swapped on reload).
#[derive(Debug)]
pub struct Admission {
    keys: ArcSwapOption<Keys>,
    /// Requests in flight per client.
    clients: Arc<Tally<Client>>,
    per_client: u32,
    max_header_count: usize,
    max_header_bytes: usize,
}

impl Admission {
    /// With `settings`' limits and no keys (every request is let in).
    pub fn new(settings: &ProxySettings) -> Self {
        Self {
            keys: ArcSwapOption::empty(),
            clients: Arc::default(),
            per_client: settings.max_concurrent_per_client,
            max_header_count: settings.max_header_count,
            max_header_bytes: settings.max_header_bytes,
        }
    }

    /// Requires a key from `keys` from now on (`None`: no key needed).
    pub fn set_keys(&self, keys: Option<Keys>) {
        self.keys.store(keys.map(Arc::new));
    }

    /// Checks a request's headers and key, and takes its client's slot.
    pub fn admit(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Admitted, RouteError> {
        if headers.len() > self.max_header_count {
            return Err(RouteError::HeadersTooLarge(format!(
                "{} header fields; at most {}",
                headers.len(),
                self.max_header_count
            )));
        }
        // As HTTP/2 counts a header list: name, value and 32 bytes each.
        let bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        if bytes > self.max_header_bytes {
            return Err(RouteError::HeadersTooLarge(format!(
                "{bytes} bytes of header fields; at most {}",
                self.max_header_bytes
            )));
        }
        let key = match &*self.keys.load() {
            None => None,
            Some(keys) => Some(keys.check(headers).map_err(|refusal| match refusal {
                Refusal::Missing => RouteError::NoApiKey,
                Refusal::Wrong => RouteError::WrongApiKey,
                Refusal::Revoked => RouteError::RevokedApiKey,
            })?),
        };
        let (client, limit) = match &key {
            Some(key) if key.max_concurrent > 0 => {
                (Client::Key(Arc::clone(&key.id)), key.max_concurrent)
            }
            Some(key) => (Client::Key(Arc::clone(&key.id)), self.per_client),
            None => (Client::Address(peer), self.per_client),
        };
        if self.clients.add(&client, limit).is_none() {
            return Err(RouteError::ClientOverloaded { limit });
        }
        Ok(Admitted {
            key,
            slot: ClientSlot {
                clients: Arc::clone(&self.clients),
                client,
            },
        })
    }
}

/// How long a body may take before its rate is judged.
const RATE_GRACE: Duration = Duration::from_secs(5);

/// Reads a request's body: at most `max_body_bytes`, within
/// `body_read_timeout`, and after a short grace at `min_body_rate` bytes a
/// second or more.
pub async fn read_body<B>(
    settings: &ProxySettings,
    headers: &HeaderMap,
    body: B,
) -> Result<Bytes, RouteError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limit = settings.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(RouteError::TooLarge { limit });
    }
    let started = Instant::now();
    let deadline = started + settings.body_read_timeout;
    let mut body = std::pin::pin!(body);
    // Most bodies come in one frame: kept as it came, without a copy.
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut received = 0usize;
    let mut check = (started + RATE_GRACE).min(deadline);
    loop {
        let frame = match tokio::time::timeout_at(check, body.frame()).await {
            Ok(frame) => frame,
            Err(_) if check >= deadline => {
                return Err(RouteError::BodyTimeout(settings.body_read_timeout));
            }
            Err(_) => {
                let elapsed = started.elapsed().as_secs_f64();
                let rate = received as f64 / elapsed;
                if rate < f64::from(settings.min_body_rate) {
                    return Err(RouteError::BodyTooSlow {
                        rate: settings.min_body_rate,
                    });
                }
                check = (Instant::now() + Duration::from_secs(1)).min(deadline);
                continue;
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            RouteError::BadRequest(format!("could not read the request body: {}", e.into()))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        received += data.len();
        if received > limit {
            return Err(RouteError::TooLarge { limit });
        }
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(first) = first.take() {
                    rest.extend_from_slice(&first);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;

    use http_body::Frame;
    use http_body_util::StreamBody;

    use super::*;

    fn settings() -> ProxySettings {
        ProxySettings {
            max_concurrent_per_client: 2,
            max_body_bytes: 16,
            body_read_timeout: Duration::from_secs(30),
            min_body_rate: 100,
            ..ProxySettings::default()
        }
    }

    fn peer(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn each_client_has_its_own_limit_and_gets_its_slots_back() {
        let admission = Admission::new(&settings());
        let headers = HeaderMap::new();
        let a = admission.admit(&headers, peer(1)).unwrap();
        let _b = admission.admit(&headers, peer(1)).unwrap();
        assert_eq!(
            admission.admit(&headers, peer(1)).unwrap_err(),
            RouteError::ClientOverloaded { limit: 2 }
        );
        // Another client is not held back.
        let _c = admission.admit(&headers, peer(2)).unwrap();
        drop(a);
        let _d = admission.admit(&headers, peer(1)).unwrap();
        drop((_b, _c, _d));
        assert!(admission.clients.lock().is_empty());
    }

    #[test]
    fn a_key_is_required_once_keys_are_set_and_carries_its_own_limit() {
        let admission = Admission::new(&settings());
        let mut file = crate::keys::KeyFile::default();
        let key = file.add("ci", 1, vec![], "now".into()).unwrap();
        admission.set_keys(Some(Keys::new(&file).unwrap()));
        assert_eq!(
            admission.admit(&HeaderMap::new(), peer(1)).unwrap_err(),
            RouteError::NoApiKey
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        let admitted = admission.admit(&headers, peer(1)).unwrap();
        // The key's limit of one holds across addresses.
        assert_eq!(
            admission.admit(&headers, peer(2)).unwrap_err(),
            RouteError::ClientOverloaded { limit: 1 }
        );
        drop(admitted);
        assert!(admission.admit(&headers, peer(2)).is_ok());
    }

    #[test]
    fn too_many_or_too_large_headers_are_refused() {
        let admission = Admission::new(&ProxySettings {
            max_header_count: 2,
            max_header_bytes: 1024,
            ..settings()
        });
        let mut headers = HeaderMap::new();
        headers.insert("a", "1".parse().unwrap());
        headers.insert("b", "x".repeat(2000).parse().unwrap());
        assert!(matches!(
            admission.admit(&headers, peer(1)),
            Err(RouteError::HeadersTooLarge(m)) if m.starts_with("2067 bytes")
        ));
        headers.insert("b", "2".parse().unwrap());
        headers.insert("c", "3".parse().unwrap());
        assert!(matches!(
            admission.admit(&headers, peer(1)),
            Err(RouteError::HeadersTooLarge(m)) if m == "3 header fields; at most 2"
        ));
    }

    fn trickle(
        chunks: Vec<(&'static [u8], Duration)>,
    ) -> impl Body<Data = Bytes, Error = Infallible> {
        let stream = futures_util::stream::unfold(chunks.into_iter(), |mut chunks| async move {
            let (chunk, wait) = chunks.next()?;
            tokio::time::sleep(wait).await;
            Some((Ok(Frame::data(Bytes::from_static(chunk))), chunks))
        });
        StreamBody::new(stream)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_is_read_whole_unless_too_large_too_slow_or_too_late() {
        let s = settings();
        let headers = HeaderMap::new();
        let one = trickle(vec![(b"hello", Duration::ZERO)]);
        assert_eq!(read_body(&s, &headers, one).await.unwrap(), "hello");
        let parts = trickle(vec![
            (b"he", Duration::ZERO),
            (b"llo", Duration::from_secs(1)),
        ]);
        assert_eq!(read_body(&s, &headers, parts).await.unwrap(), "hello");
        let large = trickle(vec![
            (b"0123456789", Duration::ZERO),
            (b"0123456789", Duration::ZERO),
        ]);
        assert_eq!(
            read_body(&s, &headers, large).await.unwrap_err(),
            RouteError::TooLarge { limit: 16 }
        );
        // One byte every 4 s: 0.25 bytes a second, below the minimum.
        let slow = trickle(vec![(b"a", Duration::from_secs(4)); 10]);
        assert_eq!(
            read_body(&s, &headers, slow).await.unwrap_err(),
            RouteError::BodyTooSlow { rate: 100 }
        );
        // Fast enough, but past the time bound.
        let late = ProxySettings {
            body_read_timeout: Duration::from_secs(3),
            ..settings()
        };
        let stalled = trickle(vec![
            (b"abc", Duration::ZERO),
            (b"d", Duration::from_secs(60)),
        ]);
        assert_eq!(
            read_body(&late, &headers, stalled).await.unwrap_err(),
            RouteError::BodyTimeout(Duration::from_secs(3))
        );
    }
}
