//! Serving the HTTP listeners (the API and the gateway) within bounds: how many connections are
//! open at once, in all and from one IP address; how long a client may take to send a request's
//! head, or keep a connection idle between requests; how long an answer may wait on a client that
//! does not read it.
//!
//! `axum::serve` took every connection and kept it as long as its client liked: hyper's
//! timeouts need a timer, which it does not give hyper. A client that opened connections and sent
//! nothing held a file descriptor each, for good, and one that stopped reading a blob held its
//! answer's task and the pieces it had read. [`serve`] runs hyper with tokio's timer and
//! [`HEADER_READ`], on connections [`Bounded`] accepts; each connection fails once a write has
//! waited on its client for [`STALLED_WRITE`]. Only writes: hyper polls the read side while a
//! handler runs and between parts of an answer, which may rightly take longer than any bound
//! (an import, a fetch's progress, a piece on its way).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a client may take to send a request's head, counted from when the connection is
/// ready for one: a connection kept idle between requests is closed after it too.
pub(crate) const HEADER_READ: Duration = Duration::from_secs(30);

/// How long a write may wait on a client that takes none of its answer.
pub(crate) const STALLED_WRITE: Duration = Duration::from_secs(60);

/// Connections open at once from one IP address, loopback aside (a reverse proxy on the same
/// machine brings every client's): past it, a new one is closed as it is accepted.
pub(crate) const PER_IP: usize = 64;

/// A TCP listener that accepts at most `total` connections at once and at most [`PER_IP`] from
/// one address other than loopback; a write on a connection fails after [`STALLED_WRITE`]
/// without progress.
pub(crate) struct Bounded {
    listener: TcpListener,
    total: Arc<Semaphore>,
    per_ip: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    idle: Duration,
    /// Whether loopback connections count against [`PER_IP`] too (in tests).
    bound_loopback: bool,
}

impl Bounded {
    pub(crate) fn new(listener: TcpListener, total: usize) -> Self {
        Self::with(listener, total, PER_IP, STALLED_WRITE)
    }

    fn with(listener: TcpListener, total: usize, per_ip: usize, idle: Duration) -> Self {
        let total = Arc::new(Semaphore::new(total));
        Self { listener, total, per_ip, open: Arc::default(), idle, bound_loopback: false }
    }

    /// The next connection, once the bounds have room for it.
    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        loop {
            // Nothing is accepted past the bound: the kernel's backlog holds the rest.
            let Ok(permit) = self.total.clone().acquire_owned().await else { std::future::pending().await };
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: a pause, as axum's own listener makes.
                    tracing::debug!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ip = addr.ip().to_canonical();
            let from = match ip.is_loopback() && !self.bound_loopback {
                true => None,
                false => {
                    // An IPv6 address's /64 counts as one address: a host has a whole /64.
                    let ip = crate::connmgr::source(ip);
                    let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                    let n = open.entry(ip).or_insert(0);
                    if *n >= self.per_ip {
                        drop(open);
                        tracing::debug!(%ip, "an HTTP connection past the bound per address, closed");
                        continue;
                    }
                    *n += 1;
                    Some(FromIp { open: self.open.clone(), ip })
                }
            };
            return (Guarded::new(stream, self.idle, permit, from), addr);
        }
    }
}

/// Serves `app` on the connections `listener` accepts, until dropped. Connections under way go
/// on after it (each ends within the bounds above).
pub(crate) async fn serve(mut listener: Bounded, app: axum::Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let (io, _) = listener.accept().await;
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ);
            if let Err(e) = http.serve_connection(TokioIo::new(io), service).await {
                tracing::trace!(error = %e, "an HTTP connection ended with an error");
            }
        });
    }
}

/// A connection's count against its address's bound; given back when the connection goes.
struct FromIp {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for FromIp {
    fn drop(&mut self) {
        crate::count_down(&mut self.open.lock().unwrap_or_else(|e| e.into_inner()), &self.ip);
    }
}

/// A connection [`Bounded`] accepted: a write that has waited the idle time on its client fails
/// with `TimedOut`, and hyper closes the connection. A write is taken to wait from its first
/// `Pending` until a write goes through: hyper polls a pending write again until it does, and
/// never drops one.
pub(crate) struct Guarded<S = TcpStream> {
    stream: S,
    idle: Duration,
    /// When the write waiting now fails; set as it begins to wait.
    deadline: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
    _permit: OwnedSemaphorePermit,
    _from: Option<FromIp>,
}

impl<S> Guarded<S> {
    fn new(stream: S, idle: Duration, permit: OwnedSemaphorePermit, from: Option<FromIp>) -> Self {
        let deadline = Box::pin(tokio::time::sleep(idle));
        Self { stream, idle, deadline, waiting: false, _permit: permit, _from: from }
    }

    /// What a write that made progress (`Ready`) or waits (`Pending`) means for the deadline.
    fn progress<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.waiting = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                // Counted from when this write began to wait, not from the last one: an answer
                // may rightly pause between two parts for longer than the bound.
                if !std::mem::replace(&mut self.waiting, true) {
                    self.deadline.as_mut().reset(tokio::time::Instant::now() + self.idle);
                }
                ready!(self.deadline.as_mut().poll(cx));
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "a write on the HTTP connection waited its bound on a client that took nothing",
                )))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.progress(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.progress(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    /// Past the bound in all, a connection waits in the kernel's backlog until one goes.
    #[tokio::test]
    async fn connections_past_the_bound_wait_until_one_closes() {
        let (listener, addr) = listener().await;
        let mut bounded = Bounded::with(listener, 2, PER_IP, STALLED_WRITE);
        let _clients: Vec<_> = futures::future::join_all((0..3).map(|_| TcpStream::connect(addr))).await;
        let first = bounded.accept().await;
        let _second = bounded.accept().await;
        let third = tokio::time::timeout(Duration::from_millis(300), bounded.accept()).await;
        assert!(third.is_err(), "a third accepted past the bound of two");
        drop(first);
        tokio::time::timeout(Duration::from_secs(10), bounded.accept()).await.expect("accepted once one closed");
    }

    /// Past the bound for one address, a connection from it is closed as it comes, and one more
    /// is let in once one of its others closed.
    #[tokio::test]
    async fn connections_past_the_bound_for_one_address_are_closed() {
        let (listener, addr) = listener().await;
        let mut bounded = Bounded::with(listener, 16, 2, STALLED_WRITE);
        bounded.bound_loopback = true;
        let first_client = TcpStream::connect(addr).await.expect("connect");
        let first = bounded.accept().await;
        let _second = (TcpStream::connect(addr).await.expect("connect"), bounded.accept().await);
        let mut third = TcpStream::connect(addr).await.expect("connect");
        assert!(tokio::time::timeout(Duration::from_millis(300), bounded.accept()).await.is_err());
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf)).await.expect("closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "the third connection was closed: {closed:?}");
        assert_eq!(bounded.open.lock().expect("lock").values().sum::<usize>(), 2);
        drop((first, first_client));
        let _fourth = TcpStream::connect(addr).await.expect("connect");
        tokio::time::timeout(Duration::from_secs(10), bounded.accept()).await.expect("accepted once one closed");
    }

    /// An answer its client stops reading fails once its write has waited the bound; a read
    /// waits as long as the client takes.
    #[tokio::test]
    async fn a_write_its_client_does_not_take_fails_and_a_read_waits() {
        let stalled = Duration::from_millis(300);
        let (listener, addr) = listener().await;
        let mut bounded = Bounded::with(listener, 4, PER_IP, stalled);
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = bounded.accept().await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(stalled * 4, server.read(&mut buf)).await;
        assert!(read.is_err(), "a read gave up on a quiet client: {read:?}");
        let chunk = vec![0u8; 1 << 20];
        let waited = tokio::time::Instant::now();
        let written = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                server.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        })
        .await
        .expect("ended");
        assert_eq!(written.map_err(|e| e.kind()).err(), Some(std::io::ErrorKind::TimedOut));
        assert!(waited.elapsed() >= stalled, "failed {:?} into its wait", waited.elapsed());
        drop(client);
    }

    /// A write that waits at once, after a pause longer than the bound since the last one went
    /// through (an answer waiting for a piece), has the whole bound to wait on its client.
    #[tokio::test(start_paused = true)]
    async fn a_write_after_a_long_pause_has_the_whole_bound() {
        let stalled = Duration::from_secs(1);
        let (mut client, server) = tokio::io::duplex(64);
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.expect("permit");
        let mut server = Guarded::new(server, stalled, permit, None);
        // The client's buffer is full after this, and it reads nothing yet.
        server.write_all(&[1; 64]).await.expect("write");
        tokio::time::sleep(stalled * 5).await;
        let started = tokio::time::Instant::now();
        let written = server.write_all(b"more").await;
        assert_eq!(written.map_err(|e| e.kind()).err(), Some(std::io::ErrorKind::TimedOut));
        assert!(started.elapsed() >= stalled, "failed {:?} into its wait", started.elapsed());
        let mut buf = [0; 64];
        client.read_exact(&mut buf).await.expect("what went through");
    }

    /// Sends `GET path` on a new connection to `addr` and reads until the server closes it.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        c.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A handler slower than every bound, and an answer waiting that long between two parts,
    /// are answered whole: only a client's own slowness is bounded. A client that sends no
    /// request is closed after [`HEADER_READ`].
    #[tokio::test(start_paused = true)]
    async fn slow_answers_are_whole_and_a_silent_client_is_closed() {
        let (listener, addr) = listener().await;
        let slow = STALLED_WRITE + HEADER_READ;
        let app = axum::Router::new()
            .route(
                "/slow",
                axum::routing::get(move || async move {
                    tokio::time::sleep(slow).await;
                    "done"
                }),
            )
            .route(
                "/gap",
                axum::routing::get(move || async move {
                    let parts = futures::stream::unfold(0, move |n| async move {
                        if n == 1 {
                            tokio::time::sleep(slow).await;
                        }
                        (n < 2).then_some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"part ")), n + 1))
                    });
                    axum::body::Body::from_stream(parts)
                }),
            );
        let server = tokio::spawn(serve(Bounded::new(listener, 8), app));
        assert!(get(addr, "/slow").await.ends_with("done"));
        assert!(get(addr, "/gap").await.contains("part \r\n5\r\npart "));
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(HEADER_READ * 4, silent.read(&mut buf)).await;
        assert!(closed.is_ok(), "a client that sent nothing was kept");
        assert!(started.elapsed() >= HEADER_READ, "closed after {:?}", started.elapsed());
        server.abort();
    }
}
