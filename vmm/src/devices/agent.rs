//! The agent channel: the guest's COM2 (ttyS1) bridged to a Unix socket the vmm listens on. One
//! client is served at a time; a second client's connection waits in the listen backlog until
//! the first leaves. The bridge never waits on the guest: bytes from the client go into a 64 KiB
//! inbox, which a feeder moves into the UART's receive FIFO as fast as the guest drains it; what
//! does not fit is dropped and counted (a guest that stops reading loses its requests, never the
//! host its callers). When a client leaves, what it sent and the guest has not taken is thrown
//! away: a request whose caller has gone is never delivered. Bytes the guest sends while no
//! client is connected are dropped (the protocol is request/response, per connection).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::legacy::Uart;

/// How long a guest write may wait on a slow client before the client is dropped: the write runs
/// on a vCPU thread.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes from the client waiting for the guest; more is dropped.
pub const INBOX_MAX: usize = 64 << 10;
/// The feeder's pause while there is nothing it can move.
const FEED_IDLE: Duration = Duration::from_millis(1);
/// How often the dropped-byte count is written out (when it changed).
const STATS_EVERY: Duration = Duration::from_secs(1);

/// The connected client, shared by the UART's output side and the bridge thread.
pub type Client = Arc<Mutex<Option<UnixStream>>>;

/// Bytes from the client on their way to the guest, and how many were dropped.
#[derive(Debug, Default)]
pub struct Inbox {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl Inbox {
    /// Takes what fits, drops the rest; returns how many were dropped.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let room = INBOX_MAX.saturating_sub(self.bytes.len());
        let take = room.min(data.len());
        self.bytes.extend(data.get(..take).unwrap_or_default());
        let lost = data.len() - take;
        self.dropped = self.dropped.saturating_add(lost as u64);
        lost
    }

    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

pub type SharedInbox = Arc<Mutex<Inbox>>;

/// UART output sink: the current client, if any.
#[derive(Debug, Clone)]
pub struct AgentOut {
    client: Client,
}

impl AgentOut {
    pub fn new(client: Client) -> Self {
        AgentOut { client }
    }
}

impl Write for AgentOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut guard = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stream) = guard.as_mut() {
            if stream.write_all(buf).is_err() {
                // The client left or stalled: drop it rather than stall the vCPU.
                *guard = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The COM2 UART.
pub type AgentUart = Uart<AgentOut>;

/// Serves `listener` until it fails: each client in turn, its bytes into the inbox, and a feeder
/// that moves the inbox into `uart` as the guest drains it. With `stats`, the dropped-byte count
/// is kept in that file (a decimal number) for the host's tools.
pub fn spawn_bridge(
    listener: UnixListener,
    uart: Arc<Mutex<AgentUart>>,
    client: Client,
    stats: Option<PathBuf>,
) -> std::io::Result<(JoinHandle<()>, SharedInbox)> {
    let inbox: SharedInbox = Arc::default();
    let feeder_inbox = inbox.clone();
    std::thread::Builder::new()
        .name("agent-feed".into())
        .spawn(move || feed(&feeder_inbox, &uart, stats.as_deref()))?;
    let bridge_inbox = inbox.clone();
    let handle = std::thread::Builder::new()
        .name("agent-bridge".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                serve(stream, &bridge_inbox, &client);
            }
        })?;
    Ok((handle, inbox))
}

/// Moves inbox bytes into the UART's receive FIFO as room appears; never blocks the bridge.
fn feed(inbox: &Mutex<Inbox>, uart: &Mutex<AgentUart>, stats: Option<&std::path::Path>) {
    let mut chunk = Vec::with_capacity(64);
    let mut written = 0u64;
    let mut last_stats = Instant::now();
    loop {
        {
            let mut u = uart.lock().unwrap_or_else(PoisonError::into_inner);
            let room = u.fifo_capacity();
            let mut ib = inbox.lock().unwrap_or_else(PoisonError::into_inner);
            let n = room.min(ib.bytes.len());
            chunk.clear();
            chunk.extend(ib.bytes.drain(..n));
            drop(ib);
            if !chunk.is_empty() {
                let _ = u.enqueue_raw_bytes(&chunk);
            }
        }
        if let Some(path) = stats {
            if last_stats.elapsed() >= STATS_EVERY {
                last_stats = Instant::now();
                let dropped = inbox.lock().unwrap_or_else(PoisonError::into_inner).dropped;
                if dropped != written && write_stats(path, dropped).is_ok() {
                    written = dropped;
                }
            }
        }
        if chunk.is_empty() {
            std::thread::sleep(FEED_IDLE);
        }
    }
}

/// Replaces the stats file with `dropped` (written aside, renamed over).
fn write_stats(path: &std::path::Path, dropped: u64) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{dropped}\n"))?;
    std::fs::rename(&tmp, path)
}

fn serve(mut stream: UnixStream, inbox: &Mutex<Inbox>, client: &Client) {
    let Ok(out) = stream.try_clone() else { return };
    let _ = out.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
    *client.lock().unwrap_or_else(PoisonError::into_inner) = Some(out);
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let lost = inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buf.get(..n).unwrap_or_default());
        if lost > 0 {
            tracing::warn!(
                bytes = lost,
                "the guest is not reading its agent port: input dropped"
            );
        }
    }
    *client.lock().unwrap_or_else(PoisonError::into_inner) = None;
    // Its caller has gone: what the guest has not taken is never delivered.
    inbox
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .bytes
        .clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::IrqLine;

    /// Reads the UART's receive buffer the way a guest driver does (LSR data-ready, then RBR).
    fn drain(uart: &Mutex<AgentUart>) -> Vec<u8> {
        let mut got = vec![];
        let mut u = uart.lock().unwrap_or_else(PoisonError::into_inner);
        while u.read(5) & 1 != 0 {
            got.push(u.read(0));
        }
        got
    }

    #[test]
    fn one_client_at_a_time_both_directions() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path)?;
        let client: Client = Arc::default();
        let uart = Arc::new(Mutex::new(AgentUart::new(
            IrqLine::new()?,
            AgentOut::new(client.clone()),
        )));
        spawn_bridge(listener, uart.clone(), client.clone(), None)?;

        let mut first = UnixStream::connect(&path)?;
        // More than the 64-byte FIFO: the bridge feeds it as the "guest" drains.
        let msg: Vec<u8> = (0..200u8).collect();
        first.write_all(&msg)?;
        let mut got = vec![];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < msg.len() && std::time::Instant::now() < deadline {
            got.extend(drain(&uart));
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(got, msg);

        // Guest -> client.
        for b in b"pong" {
            let _ = uart
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(0, *b);
        }
        let mut reply = [0u8; 4];
        first.read_exact(&mut reply)?;
        assert_eq!(&reply, b"pong");

        // A second client waits until the first leaves.
        let mut second = UnixStream::connect(&path)?;
        second.write_all(b"2")?;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(drain(&uart), b"");
        drop(first);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut got = vec![];
        while got.is_empty() && std::time::Instant::now() < deadline {
            got = drain(&uart);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(got, b"2");
        Ok(())
    }

    #[test]
    fn a_guest_that_stops_reading_never_blocks_the_bridge_and_stale_requests_are_dropped(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.sock");
        let stats = dir.path().join("agent.sock.dropped");
        let listener = UnixListener::bind(&path)?;
        let client: Client = Arc::default();
        let uart = Arc::new(Mutex::new(AgentUart::new(
            IrqLine::new()?,
            AgentOut::new(client.clone()),
        )));
        let (_, inbox) = spawn_bridge(listener, uart.clone(), client, Some(stats.clone()))?;
        // The guest reads nothing; the caller sends 200 KiB and goes away.
        let mut first = UnixStream::connect(&path)?;
        first.set_write_timeout(Some(Duration::from_secs(5)))?;
        first.write_all(&vec![b'a'; 200 << 10])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let dropped = || {
            inbox
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .dropped()
        };
        while dropped() < (200 << 10) - INBOX_MAX as u64 - 64
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let d = dropped();
        assert!(d >= (200 << 10) - INBOX_MAX as u64 - 64, "dropped {d}");
        drop(first);
        // The next caller is served at once; nothing of the first one's waits for the guest
        // but the 64 bytes already in the UART's FIFO.
        let mut second = UnixStream::connect(&path)?;
        second.write_all(b"ping")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut got = vec![];
        while !got.ends_with(b"ping") && std::time::Instant::now() < deadline {
            got.extend(drain(&uart));
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            got.ends_with(b"ping"),
            "the second caller's bytes never came"
        );
        assert!(got.len() <= 64 + 4, "stale bytes delivered: {}", got.len());
        // The count is published for `vm ls`.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !stats.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(std::fs::read_to_string(&stats)?.trim().parse::<u64>()?, d);
        Ok(())
    }
}
