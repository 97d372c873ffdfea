//! A TCP proxy on loopback that makes a link slow or broken on demand (issue 20's link drills):
//! put it between a worker and the coordinator, then add latency to every chunk it forwards, cut
//! every connection through it at once, or black-hole the link (connections stay open, nothing
//! passes) and heal it again. Plain threads and blocking sockets: it forwards bytes, it does not
//! parse them, so it serves gRPC, HTTP or anything else alike.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to the bytes it forwards, changed while it runs.
#[derive(Default)]
struct Faults {
    /// Milliseconds each chunk waits before it is forwarded.
    delay_ms: AtomicU64,
    /// Nothing is forwarded (the bytes wait) while set.
    black_hole: AtomicBool,
    /// Every connection open now, to cut them all (`Proxy::cut`).
    open: Mutex<Vec<TcpStream>>,
    stopped: AtomicBool,
}

/// A proxy from a free loopback port to `target`; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    faults: Arc<Faults>,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let faults = Arc::new(Faults::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let (f, n) = (faults.clone(), accepted.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if f.stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    drop(client); // the target is down: so is the link
                    continue;
                };
                n.fetch_add(1, Ordering::Relaxed);
                for s in [&client, &server] {
                    let _ = s.set_nodelay(true);
                    if let Ok(clone) = s.try_clone() {
                        f.open.lock().unwrap_or_else(|e| e.into_inner()).push(clone);
                    }
                }
                let (c2, s2) = (client.try_clone(), server.try_clone());
                if let (Ok(c2), Ok(s2)) = (c2, s2) {
                    let (fa, fb) = (f.clone(), f.clone());
                    std::thread::spawn(move || pump(client, s2, &fa));
                    std::thread::spawn(move || pump(server, c2, &fb));
                }
            }
        });
        Proxy { addr, faults, accepted }
    }

    /// Every chunk waits `delay` before it goes on (in both directions).
    pub fn set_delay(&self, delay: Duration) {
        self.faults.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// While on, nothing passes in either direction; the connections stay open.
    pub fn set_black_hole(&self, on: bool) {
        self.faults.black_hole.store(on, Ordering::Relaxed);
    }

    /// Cuts every connection open now (both ends see a reset or an end of stream); new ones pass.
    pub fn cut(&self) {
        for s in self.faults.open.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Connections accepted so far (a client that reconnects adds one).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.faults.stopped.store(true, Ordering::Relaxed);
        self.cut();
        // Wakes the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` until either end closes, applying the faults chunk by chunk.
fn pump(mut from: TcpStream, mut to: TcpStream, faults: &Faults) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while faults.black_hole.load(Ordering::Relaxed) && !faults.stopped.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let delay = faults.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
