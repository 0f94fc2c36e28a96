//! A TCP proxy that makes a storage server stall: it forwards every connection to the server and,
//! while stalling is on, holds each HTTP request that starts with `PUT ` for a while before it
//! forwards it (the request's client waits; nothing else through the proxy does). Plain std::net
//! threads, two per connection.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The proxy; it stops accepting when dropped (connections open then run to their end).
pub struct StallingProxy {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    stalling: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    released: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl StallingProxy {
    /// Listens on a free loopback port, forwarding to `upstream` (`host:port`); a PUT that arrives
    /// while stalling is on waits `hold` before it is forwarded.
    pub fn start(upstream: &str, hold: Duration) -> StallingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let proxy = StallingProxy {
            url: format!("http://{addr}"),
            addr,
            stalling: Arc::default(),
            held: Arc::default(),
            released: Arc::default(),
            stop: Arc::default(),
        };
        let upstream = upstream.to_string();
        let (stalling, held, released, stop) = (
            proxy.stalling.clone(),
            proxy.held.clone(),
            proxy.released.clone(),
            proxy.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => continue,
                };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let (stalling, held, released) = (stalling.clone(), held.clone(), released.clone());
                std::thread::spawn(move || {
                    connection(client, server, hold, &stalling, &held, &released)
                });
            }
        });
        proxy
    }

    /// Turns stalling on or off (a PUT already held still waits its time).
    pub fn stall(&self, on: bool) {
        self.stalling.store(on, Ordering::SeqCst);
    }

    /// PUT requests held so far.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Held PUT requests forwarded after their wait.
    pub fn released(&self) -> usize {
        self.released.load(Ordering::SeqCst)
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Pumps one connection both ways. A client read that follows a reply (or opens the connection)
/// starts a request: one starting with `PUT ` is held while stalling is on.
fn connection(
    mut client: TcpStream,
    mut server: TcpStream,
    hold: Duration,
    stalling: &AtomicBool,
    held: &AtomicUsize,
    released: &AtomicUsize,
) {
    let fresh = Arc::new(AtomicBool::new(true));
    let (Ok(mut server_out), Ok(mut client_in)) = (server.try_clone(), client.try_clone()) else {
        return;
    };
    let replies = {
        let fresh = fresh.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match server_out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        fresh.store(true, Ordering::SeqCst);
                        if client_in.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = client_in.shutdown(Shutdown::Write);
        })
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let starts = fresh.swap(false, Ordering::SeqCst);
                if starts && stalling.load(Ordering::SeqCst) && buf[..n].starts_with(b"PUT ") {
                    held.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(hold);
                    released.fetch_add(1, Ordering::SeqCst);
                }
                if server.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = server.shutdown(Shutdown::Write);
    let _ = replies.join();
}
