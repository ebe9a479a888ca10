//! The agent channel: the guest's COM2 (ttyS1) bridged to a Unix socket the vmm listens on. One
//! client is served at a time; a second client's connection waits in the listen backlog until
//! the first leaves. Bytes from the client enter the UART's receive FIFO only as fast as the guest
//! drains it, so nothing is dropped on the way in; bytes the guest sends while no client is
//! connected are dropped (the protocol is request/response, per connection).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::legacy::{feed_uart, Uart};

/// How long a guest write may wait on a slow client before the client is dropped: the write runs
/// on a vCPU thread.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The connected client, shared by the UART's output side and the bridge thread.
pub type Client = Arc<Mutex<Option<UnixStream>>>;

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

/// Serves `listener` until it fails: each client in turn, its bytes into `uart`.
pub fn spawn_bridge(
    listener: UnixListener,
    uart: Arc<Mutex<AgentUart>>,
    client: Client,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("agent-bridge".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                serve(stream, &uart, &client);
            }
        })
}

fn serve(mut stream: UnixStream, uart: &Mutex<AgentUart>, client: &Client) {
    let Ok(out) = stream.try_clone() else { return };
    let _ = out.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
    *client.lock().unwrap_or_else(PoisonError::into_inner) = Some(out);
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        feed_uart(uart, buf.get(..n).unwrap_or_default());
    }
    *client.lock().unwrap_or_else(PoisonError::into_inner) = None;
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
        spawn_bridge(listener, uart.clone(), client.clone())?;

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
}
