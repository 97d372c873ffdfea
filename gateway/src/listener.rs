//! Where the HTTP API accepts connections: plain TCP or HTTPS, both without Nagle's algorithm
//! (an SSE token chunk is a few bytes that Nagle would hold behind unacknowledged ones, as uvicorn,
//! vLLM's server, knows), and the client's address for the logs ([`PeerAddr`]).
//!
//! HTTPS ([`https`]): each TCP connection's TLS handshake runs in a task of its own, bounded by
//! [`awq_auth::HANDSHAKE_TIMEOUT`], so a client that stalls mid-handshake (or a plaintext one,
//! refused by rustls) never holds up the others; finished handshakes are what the server accepts.

use std::io;
use std::net::SocketAddr;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The client's address, as the API key check logs it (`ConnectInfo<PeerAddr>`), whichever
/// listener accepted the connection.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, PlainListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, PlainListener>) -> PeerAddr {
        PeerAddr(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, HttpsListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, HttpsListener>) -> PeerAddr {
        PeerAddr(*stream.remote_addr())
    }
}

/// Plain TCP, without Nagle's algorithm.
pub struct PlainListener(TcpListener);

/// Plain TCP on `listener`.
pub fn plain(listener: TcpListener) -> PlainListener {
    PlainListener(listener)
}

impl Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        // axum's own TcpListener accept: retries errors (out of file descriptors) after a pause.
        let (mut tcp, peer) = Listener::accept(&mut self.0).await;
        no_delay(&mut tcp);
        (tcp, peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

fn no_delay(stream: &mut TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY not set on a connection: {e}");
    }
}

/// HTTPS on `listener` with `acceptor` (see the module docs). Call it inside a tokio runtime.
pub fn https(listener: TcpListener, acceptor: TlsAcceptor) -> io::Result<HttpsListener> {
    let local = listener.local_addr()?;
    let (done, handshaken) = mpsc::channel(64);
    let accepting = tokio::spawn(async move {
        loop {
            let (mut tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!("HTTPS: cannot accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            no_delay(&mut tcp);
            let (acceptor, done) = (acceptor.clone(), done.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(awq_auth::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = done.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "HTTPS: handshake refused: {e}"),
                    Err(_) => {
                        tracing::debug!(%peer, "HTTPS: handshake not done within {:?}", awq_auth::HANDSHAKE_TIMEOUT)
                    }
                }
            });
        }
    });
    Ok(HttpsListener { handshaken, local, accepting })
}

/// Connections whose TLS handshake is done ([`https`]).
pub struct HttpsListener {
    handshaken: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(connection) => connection,
            // The accepting task ended (it only does when dropped): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl Drop for HttpsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}
