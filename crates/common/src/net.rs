//! Addresses: `host:port` checks, and local ports for programs started on
//! 127.0.0.1 (the demo, the tests).

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// First port tried.
const LOW: u32 = 20_000;
/// How many ports from `LOW`: up to 32767, below Linux's ephemeral range.
const SPAN: u32 = 12_768;

/// A port on 127.0.0.1 that is free now, for a program that binds its own
/// listener.
///
/// It is released before the program binds it, so it is picked below the
/// ephemeral range (32768 and up), where the kernel never hands out the
/// source port of an outgoing connection: under a load of client
/// connections a port from `bind(0)` is soon taken again. Ports are tried
/// in a scattered order (a stride coprime with the range visits each once).
pub fn free_loopback_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // One starting point per process: with it the stride never repeats a
    // port within the process; across processes it differs.
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        (std::process::id() % SPAN)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() % SPAN)
    });
    for _ in 0..1000 {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + seed.wrapping_add(step.wrapping_mul(7_919)) % SPAN;
        let port = u16::try_from(port).map_err(std::io::Error::other)?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port on 127.0.0.1 between 20000 and 32767",
    ))
}

/// Whether `address` is `host:port` with a host and a port above 0.
pub fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..20).map(|_| free_loopback_port().unwrap()).collect();
        assert!(
            ports.iter().all(|p| (20_000..32_768).contains(p)),
            "{ports:?}"
        );
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }
}
