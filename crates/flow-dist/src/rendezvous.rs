//! Rank 0 hands the other processes a few bytes over TCP (NCCL's unique id, which
//! every process needs before NCCL can connect them), at the address `torchrun` sets
//! in `MASTER_ADDR` and `MASTER_PORT`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    time::{Duration, Instant},
};

/// Opens every message, so that a process that reaches some other service on the
/// port says so instead of reading garbage.
const MAGIC: &[u8; 8] = b"flowsid1";

/// How long a process waits between tries to reach rank 0, which may not listen yet.
const RETRY: Duration = Duration::from_millis(50);

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no such address"))
}

/// Rank 0: listens at `addr` and sends `bytes` to each of `peers` processes, waiting
/// at most `timeout` for them all.
pub fn serve_id(addr: &str, peers: usize, bytes: &[u8], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let listener =
        TcpListener::bind(resolve(addr)?).map_err(|e| format!("cannot listen at {addr}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut served = 0;
    while served < peers {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_write_timeout(Some(timeout)))
                    .and_then(|()| stream.write_all(MAGIC))
                    .and_then(|()| stream.write_all(&(bytes.len() as u32).to_le_bytes()))
                    .and_then(|()| stream.write_all(bytes))
                    .map_err(|e| format!("sending the id from {addr}: {e}"))?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{served} of the other {peers} processes reached {addr} within {} s",
                        timeout.as_secs_f64()
                    ));
                }
                std::thread::sleep(RETRY);
            }
            Err(e) => return Err(format!("{addr}: {e}")),
        }
    }
    Ok(())
}

/// Any other rank: reads the bytes rank 0 serves at `addr` (at most `max_len`),
/// trying for at most `timeout`.
pub fn receive_id(addr: &str, max_len: usize, timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let target = resolve(addr)?;
    let mut stream = loop {
        match TcpStream::connect_timeout(&target, RETRY.max(Duration::from_millis(1))) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "rank 0 did not answer at {addr} within {} s: {e}",
                    timeout.as_secs_f64()
                ))
            }
            Err(_) => std::thread::sleep(RETRY),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut magic = [0u8; 8];
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut magic)
        .and_then(|()| stream.read_exact(&mut len))
        .map_err(|e| format!("reading the id from {addr}: {e}"))?;
    let len = u32::from_le_bytes(len) as usize;
    if &magic != MAGIC || len > max_len {
        return Err(format!("{addr} is not rank 0 of this run"));
    }
    let mut bytes = vec![0u8; len];
    stream
        .read_exact(&mut bytes)
        .map_err(|e| format!("reading the id from {addr}: {e}"))?;
    Ok(bytes)
}
