//! QUIC streams that were sent whole and then dropped unread stay open until the peer's end
//! closes, so that a one-way message is delivered.
//!
//! Streams name their protocol with their first bytes (libp2p's `V1Lazy`, see `swarm.rs`): the
//! listener answers with a header and a confirmation before it reads the message behind them.
//! Kademlia's `ADD_PROVIDER` is one-way: its sender writes the request, closes its side and drops
//! the stream. A QUIC stream dropped before its incoming side is read to the end tells the peer to
//! stop sending (`STOP_SENDING`), so the listener's confirmation fails to go out, its negotiation
//! fails, and the request is never read: provider records never reached the nodes an announcement
//! chose, and only the provider itself could name them (seen with two nodes on loopback: the
//! receiver counted no `add_provider` request). Over netsim's yamux, a dropped stream only closes,
//! and the record arrived.
//!
//! An outbound stream whose sending side was closed and from which nothing was read is handed, as
//! it is dropped, to a task that reads the peer's few bytes (its header and confirmation) until
//! the peer closes, for at most [`LINGER`] and [`MAX_DRAINED`] bytes, and at most [`MAX_LINGERING`]
//! at once. Every other stream drops as before: one the node read from has had its answer, and one
//! dropped before it was sent whole was abandoned.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};

/// How long a dropped stream waits for the peer to close its end.
pub(crate) const LINGER: Duration = Duration::from_secs(10);

/// Bytes a lingering stream reads before it gives up on the peer closing: a listener's header and
/// confirmation are a few dozen.
pub(crate) const MAX_DRAINED: u64 = 4096;

/// Streams lingering at once per connection's muxer; past it, a dropped stream closes at once.
pub(crate) const MAX_LINGERING: usize = 64;

/// A stream muxer whose outbound streams linger (see the module).
#[derive(Debug)]
pub(crate) struct Lingering<M> {
    inner: M,
    lingering: Arc<AtomicUsize>,
}

impl<M> Lingering<M> {
    pub(crate) fn new(inner: M) -> Self {
        Self { inner, lingering: Arc::default() }
    }
}

impl<M> StreamMuxer for Lingering<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin + Send + 'static,
{
    type Substream = Linger<M::Substream>;
    type Error = M::Error;

    fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner).poll_inbound(cx).map_ok(|s| Linger::new(s, None))
    }

    fn poll_outbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        let lingering = this.lingering.clone();
        Pin::new(&mut this.inner).poll_outbound(cx).map_ok(|s| Linger::new(s, Some(lingering)))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll(cx)
    }
}

/// A stream of a [`Lingering`] muxer.
#[derive(Debug)]
pub(crate) struct Linger<S: AsyncRead + Unpin + Send + 'static> {
    /// `None` once dropped.
    inner: Option<S>,
    /// The count of lingering streams to join on drop; `None` for inbound streams.
    lingering: Option<Arc<AtomicUsize>>,
    /// Whether our side was closed (the message sent whole).
    closed: bool,
    /// Whether anything was read, the end included.
    read: bool,
}

impl<S: AsyncRead + Unpin + Send + 'static> Linger<S> {
    fn new(inner: S, lingering: Option<Arc<AtomicUsize>>) -> Self {
        Self { inner: Some(inner), lingering, closed: false, read: false }
    }

    fn inner(&mut self) -> Pin<&mut S> {
        Pin::new(self.inner.as_mut().expect("a stream is only taken out when dropped"))
    }
}

impl<S: AsyncRead + Unpin + Send + 'static> AsyncRead for Linger<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = ready!(this.inner().poll_read(cx, buf));
        this.read = true;
        Poll::Ready(r)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Linger<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().inner().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner().poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(this.inner().poll_close(cx));
        this.closed |= r.is_ok();
        Poll::Ready(r)
    }
}

impl<S: AsyncRead + Unpin + Send + 'static> Drop for Linger<S> {
    fn drop(&mut self) {
        let (Some(stream), Some(count)) = (self.inner.take(), self.lingering.take()) else { return };
        if !self.closed || self.read {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let slot = Slot(count);
        if slot.0.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
            tracing::debug!("too many streams linger on this connection; one is dropped unconfirmed");
            return;
        }
        runtime.spawn(async move {
            let _ = tokio::time::timeout(LINGER, drain(stream)).await;
            drop(slot);
        });
    }
}

/// A place among a connection's lingering streams, given back when dropped, however the task
/// holding it ends (a runtime shutting down drops it unfinished).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads until the peer closes, an error, or [`MAX_DRAINED`] bytes.
async fn drain(stream: impl AsyncRead + Unpin) {
    let mut sink = futures::io::sink();
    let _ = futures::io::copy(stream.take(MAX_DRAINED), &mut sink).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};

    /// A stream that records whether it was dropped; it reads what its feed sends, and ends when
    /// the feed is dropped.
    struct Probe {
        reads: futures::channel::mpsc::UnboundedReceiver<Vec<u8>>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
    }

    impl AsyncRead for Probe {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
            use futures::StreamExt;
            match ready!(self.reads.poll_next_unpin(cx)) {
                Some(bytes) => {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    Poll::Ready(Ok(n))
                }
                None => Poll::Ready(Ok(0)),
            }
        }
    }

    impl AsyncWrite for Probe {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    type Feed = futures::channel::mpsc::UnboundedSender<Vec<u8>>;

    /// An outbound stream joining `count`'s lingering streams, or an inbound one for `None`.
    fn probe(count: Option<&Arc<AtomicUsize>>) -> (Linger<Probe>, Feed, Arc<std::sync::atomic::AtomicBool>) {
        let (tx, reads) = futures::channel::mpsc::unbounded();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (Linger::new(Probe { reads, dropped: dropped.clone() }, count.cloned()), tx, dropped)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_message_sent_whole_and_dropped_unread_waits_for_the_peer_to_close() {
        let count = Arc::new(AtomicUsize::new(0));
        let (mut s, feed, dropped) = probe(Some(&count));
        s.write_all(b"request").await.expect("write");
        s.close().await.expect("close");
        drop(s);
        settle().await;
        assert!(!dropped.load(Ordering::SeqCst), "dropped before the peer closed");
        assert_eq!(count.load(Ordering::SeqCst), 1);
        feed.unbounded_send(b"header and confirmation".to_vec()).expect("feed");
        settle().await;
        assert!(!dropped.load(Ordering::SeqCst), "the peer has not closed yet");
        drop(feed);
        settle().await;
        assert!(dropped.load(Ordering::SeqCst), "kept after the peer closed");
        assert_eq!(count.load(Ordering::SeqCst), 0, "the count goes back down");
    }

    #[tokio::test]
    async fn streams_read_from_or_never_closed_drop_at_once() {
        let count = Arc::new(AtomicUsize::new(0));
        // Answered: the request was read back.
        let (mut s, feed, dropped) = probe(Some(&count));
        s.write_all(b"request").await.expect("write");
        s.close().await.expect("close");
        feed.unbounded_send(b"answer".to_vec()).expect("feed");
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.expect("read");
        drop(s);
        assert!(dropped.load(Ordering::SeqCst));
        // Abandoned: never sent whole.
        let (mut s, _feed, dropped) = probe(Some(&count));
        s.write_all(b"half a req").await.expect("write");
        drop(s);
        assert!(dropped.load(Ordering::SeqCst));
        // Inbound streams never linger.
        let (mut s, _feed, dropped) = probe(None);
        s.close().await.expect("close");
        drop(s);
        assert!(dropped.load(Ordering::SeqCst));
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_is_bounded_in_time_in_bytes_and_in_number() {
        let count = Arc::new(AtomicUsize::new(0));
        // A peer that never closes: dropped after the linger time.
        let (mut s, _silent, dropped) = probe(Some(&count));
        s.close().await.expect("close");
        drop(s);
        settle().await;
        assert!(!dropped.load(Ordering::SeqCst));
        tokio::time::sleep(LINGER + Duration::from_millis(1)).await;
        settle().await;
        assert!(dropped.load(Ordering::SeqCst), "a silent peer is not waited for past the linger time");
        // A peer that keeps sending: dropped once the bound is read.
        let (mut s, feed, dropped) = probe(Some(&count));
        s.close().await.expect("close");
        drop(s);
        for _ in 0..=MAX_DRAINED / 1024 {
            feed.unbounded_send(vec![0; 1024]).expect("feed");
        }
        settle().await;
        assert!(dropped.load(Ordering::SeqCst), "a peer that keeps sending is not read past the bound");
        // At most MAX_LINGERING at once.
        let mut held = Vec::new();
        for _ in 0..MAX_LINGERING {
            let (mut s, feed, dropped) = probe(Some(&count));
            s.close().await.expect("close");
            drop(s);
            held.push((feed, dropped));
        }
        settle().await;
        assert_eq!(count.load(Ordering::SeqCst), MAX_LINGERING);
        assert!(held.iter().all(|(_, d)| !d.load(Ordering::SeqCst)));
        let (mut s, _feed, dropped) = probe(Some(&count));
        s.close().await.expect("close");
        drop(s);
        assert!(dropped.load(Ordering::SeqCst), "past the bound a stream drops at once");
        drop(held);
        settle().await;
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
