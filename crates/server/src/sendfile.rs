//! Blob files handed to the socket by the kernel (`sendfile`), on plain HTTP/1 connections.
//!
//! A warm blob is a file whose bytes are final. Streaming it through hyper costs two copies per
//! byte (page cache → pier's buffer → socket); `sendfile` costs none, which is how nginx serves
//! files. hyper owns the connection and writes bodies as `Bytes`, so the file's bytes travel to
//! the socket on a side path:
//!
//! - A handler that answers with a complete blob file marks its response with a [`FileRegion`]
//!   (it also carries an ordinary streaming body, used wherever this path is not available:
//!   TLS, HTTP/2, in-process callers).
//! - On a plain HTTP/1 connection, [`Files::send`] swaps that body for one whose frames are
//!   *placeholders*: slices of [`PLACEHOLDER`], a static buffer nothing ever reads, one frame per
//!   piece of the file, each piece queued on the connection as it is yielded.
//! - hyper writes bodies through the connection's [`Socket`] with vectored writes (never copying
//!   them: `writev` is forced on). The socket recognises a placeholder slice by its address and
//!   sends the queued piece of the file with `sendfile` instead, returning the count hyper
//!   expects.
//!
//! `sendfile` runs on the runtime's thread, so a piece not in the page cache (judged by
//! `preadv2(RWF_NOWAIT)`) is first read from disk on the blocking pool, as the streaming reader
//! does; and a body yields to the runtime's other tasks between pieces.
//!
//! The socket checks that each placeholder slice is exactly where the front of its queue says
//! the file's bytes are (offset and length); anything else ends the connection with an error, so
//! a mismatch can cut a response short but never put wrong bytes on the wire. A file truncated
//! behind pier's back ends the connection the same way (the client sees a short body); a file
//! evicted (unlinked) while sent is still read through its open descriptor.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use pier_metrics::IntCounter;
use rustix::fs::Advice;
use rustix::io::ReadWriteFlags;
use rustix::net::{SendAncillaryBuffer, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::response::Body;

/// Largest piece of a file one body frame stands for (and the size of [`PLACEHOLDER`]). Large,
/// because a frame costs a trip through hyper while memory does not grow with it: the kernel
/// sends as much of a piece as the socket takes.
const PIECE: usize = 1 << 20;

/// The bytes placeholder frames point into. Zeroed and never read or written (it lives in the
/// binary's zero-initialised segment and costs no memory); only its address range matters.
static PLACEHOLDER: [u8; PIECE] = [0; PIECE];

/// A response's body as a byte range of a complete, verified file: set by the handler beside the
/// streaming body, for the connection to send the file itself when it can.
#[derive(Clone, Debug)]
pub(crate) struct FileRegion {
    pub file: Arc<File>,
    pub start: u64,
    pub len: u64,
}

/// A piece of a file queued for the socket: what the next placeholder bytes stand for.
struct Piece {
    file: Arc<File>,
    offset: u64,
    len: usize,
    /// Bytes of the piece already sent.
    sent: usize,
    /// Counts the bytes as `sendfile` sends them (`pier_served_bytes_total`).
    served: Option<IntCounter>,
    /// The first piece of its response, sent corked with the response's head.
    first: bool,
}

/// The pieces a connection's responses queued, in the order hyper will write them.
type Queue = Arc<Mutex<VecDeque<Piece>>>;

/// A plain TCP connection whose writes send queued file pieces with `sendfile`.
pub(crate) struct Socket {
    tcp: TcpStream,
    queue: Queue,
    /// Whether `TCP_CORK` is set. A response's head and its file's first piece go corked, so
    /// that they leave in full segments (nginx's `tcp_nopush`); the cork comes off when the
    /// queue empties. So a client that keeps up gets each later piece pushed as it is sent,
    /// uncorked, while for a client slower than the socket (its next piece is queued before
    /// this one is through) the pieces stay corked and leave in full segments. Measured on warm
    /// blobs: corking every piece as nginx does gave nginx's throughput with one connection
    /// (0.9x-1.0x), pushing every piece uncorked lost to it with 16 (0.83x for 1 GiB); this
    /// gave 1.5x-1.7x and 1.1x-1.2x.
    corked: bool,
}

/// The connection's side of [`Socket`], for its requests: swaps file responses for placeholders.
#[derive(Clone)]
pub(crate) struct Files {
    queue: Queue,
}

impl Socket {
    pub(crate) fn new(tcp: TcpStream) -> (Socket, Files) {
        let queue = Queue::default();
        (
            Socket {
                tcp,
                queue: queue.clone(),
                corked: false,
            },
            Files { queue },
        )
    }

    /// Sends up to `slice.len()` bytes of the queue's front piece, which `slice` (a placeholder)
    /// must stand for exactly.
    fn poll_send_piece(&mut self, cx: &mut Context<'_>, slice: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(piece) = queue.front_mut() else {
                return Poll::Ready(Err(mismatch("placeholder bytes with no file queued")));
            };
            if placeholder_offset(slice) != Some(piece.sent) || slice.len() > piece.len - piece.sent
            {
                return Poll::Ready(Err(mismatch(
                    "placeholder bytes out of step with the queued file",
                )));
            }
            let mut offset = piece.offset + piece.sent as u64;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.tcp, &*piece.file, Some(&mut offset), slice.len())
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file shorter than its recorded size",
                    )))
                }
                Ok(n) => {
                    piece.sent += n;
                    if let Some(served) = &piece.served {
                        served.inc_by(n as u64);
                    }
                    if piece.sent == piece.len {
                        queue.pop_front();
                        if queue.is_empty() && self.corked {
                            self.corked = false;
                            rustix::net::sockopt::set_tcp_cork(&self.tcp, false)?;
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                // Readiness was cleared by try_io: wait for the socket again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `bufs` (none a placeholder), telling the kernel that more follows when `more`, so
    /// that a response's head and the start of its file leave in the same packets.
    fn poll_write_plain(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        more: bool,
    ) -> Poll<io::Result<usize>> {
        let flags = if more {
            SendFlags::MORE | SendFlags::NOSIGNAL
        } else {
            SendFlags::NOSIGNAL
        };
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let written = self.tcp.try_io(Interest::WRITABLE, || {
                rustix::net::sendmsg(&self.tcp, bufs, &mut SendAncillaryBuffer::default(), flags)
                    .map_err(io::Error::from)
            });
            match written {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }
}

/// Whether `bytes` are placeholder bytes, standing for a file piece the socket sends (and
/// counts) itself.
pub(crate) fn is_placeholder(bytes: &[u8]) -> bool {
    placeholder_offset(bytes).is_some()
}

/// Where `slice` starts in [`PLACEHOLDER`], if it lies within it.
fn placeholder_offset(slice: &[u8]) -> Option<usize> {
    let base = PLACEHOLDER.as_ptr() as usize;
    let at = (slice.as_ptr() as usize).checked_sub(base)?;
    (at < PIECE && slice.len() <= PIECE - at).then_some(at)
}

fn mismatch(what: &str) -> io::Error {
    io::Error::other(format!("sendfile path: {what}"))
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(first) = bufs.iter().position(|b| placeholder_offset(b).is_some()) else {
            return Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        };
        let starts_response = this
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .front()
            .is_some_and(|p| p.first && p.sent == 0);
        if starts_response && !this.corked {
            rustix::net::sockopt::set_tcp_cork(&this.tcp, true)?;
            this.corked = true;
        }
        if first == 0 {
            return this.poll_send_piece(cx, &bufs[0]);
        }
        // Plain bytes (a response's head) before the file's: write them first, then as much of
        // the file as the socket takes right away.
        let plain = &bufs[..first];
        let total: usize = plain.iter().map(|b| b.len()).sum();
        let n = ready!(this.poll_write_plain(cx, plain, true))?;
        if n < total {
            return Poll::Ready(Ok(n));
        }
        match this.poll_send_piece(cx, &bufs[first]) {
            Poll::Ready(Ok(m)) => Poll::Ready(Ok(n + m)),
            // The plain bytes are written: report them; the file's turn comes on the next call
            // (which meets the same error, if there was one).
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(Ok(n)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl Files {
    /// `resp` with its body sent from its file, when the handler marked it with a
    /// [`FileRegion`]; otherwise `resp` as it is. Call it only for HTTP/1 requests on the
    /// connection of this `Files`: the swapped body is meaningful to its [`Socket`] alone.
    /// `served` counts the file's bytes as the socket sends them.
    pub(crate) fn send(
        &self,
        mut resp: Response<Body>,
        served: Option<IntCounter>,
    ) -> Response<Body> {
        let Some(region) = resp.extensions_mut().remove::<FileRegion>() else {
            return resp;
        };
        if !matches!(resp.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT) {
            return resp;
        }
        // The body is the region's bytes, whatever the handler wrote.
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(region.len));
        // The first piece is read ahead while the head is written.
        advise_read(&region.file, region.start, region.len);
        let body = FileBody {
            region,
            queue: self.queue.clone(),
            served,
            loading: None,
            yield_next: false,
            read_ahead: false,
            first: true,
        };
        resp.map(|_| body.boxed_unsync())
    }
}

/// Asks the kernel to read `[offset, offset + PIECE.min(len))` of `file` into the page cache in
/// the background, so that the next piece is there when its turn comes. Only advice: failure
/// changes nothing but speed.
fn advise_read(file: &File, offset: u64, len: u64) {
    if let Some(len) = NonZeroU64::new(len.min(PIECE as u64)) {
        let _ = rustix::fs::fadvise(file.as_fd(), offset, Some(len), Advice::WillNeed);
    }
}

/// Whether `[offset, offset + len)` of `file` is in the page cache, judged by its first and last
/// byte (`preadv2` with `RWF_NOWAIT` reads only what needs no disk). Pages are read ahead and
/// evicted in runs, so the two ends stand for the piece; a page missed in between costs one
/// short wait for the disk, not a wrong byte.
fn resident(file: &File, offset: u64, len: usize) -> bool {
    let mut byte = [0u8; 1];
    let last = offset + len.saturating_sub(1) as u64;
    [offset, last].into_iter().all(|at| {
        matches!(
            rustix::io::preadv2(
                file,
                &mut [IoSliceMut::new(&mut byte)],
                at,
                ReadWriteFlags::NOWAIT
            ),
            Ok(1)
        )
    })
}

/// Reads `[offset, offset + len)` of `file` into the page cache (on the blocking pool: this
/// waits for the disk), so that `sendfile` on the runtime's thread then finds it there. Errors
/// are left for `sendfile` to meet.
fn load(file: &File, offset: u64, len: usize) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < len {
        let want = buf.len().min(len - done);
        match file.read_at(&mut buf[..want], offset + done as u64) {
            Ok(0) | Err(_) => return,
            Ok(n) => done += n,
        }
    }
}

/// A body of placeholder frames standing for a file's bytes, each queued for the socket as it is
/// yielded.
struct FileBody {
    /// What is left to yield.
    region: FileRegion,
    queue: Queue,
    served: Option<IntCounter>,
    /// The next piece, being read from disk on the blocking pool because it was not in the page
    /// cache: `sendfile` runs on the runtime's thread, where a wait for the disk would hold up
    /// every connection of that thread.
    loading: Option<JoinHandle<()>>,
    /// Whether to let the runtime's other tasks run before the next piece: a client that takes
    /// bytes as fast as the kernel sends them gets one piece per turn, not the whole file.
    yield_next: bool,
    /// Whether a piece had to be read from disk: from then on each next piece is read ahead
    /// (on a file in the page cache the advice is a walk over its pages for nothing; on a cold
    /// one it keeps the disk a piece ahead, where advising only after a cold piece would let
    /// every other piece wait for the disk).
    read_ahead: bool,
    /// Whether no piece was yielded yet (the next is the one sent with the head).
    first: bool,
}

impl HttpBody for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        if this.region.len == 0 {
            return Poll::Ready(None);
        }
        let len = this.region.len.min(PIECE as u64) as usize;
        match this.loading.as_mut() {
            // A failed load (a panic, a shut-down runtime) only means that `sendfile` reads the
            // disk itself.
            Some(loading) => {
                let _ = ready!(Pin::new(loading).poll(cx));
                this.loading = None;
            }
            None => {
                if this.yield_next {
                    this.yield_next = false;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let cold = !resident(&this.region.file, this.region.start, len);
                this.read_ahead |= cold;
                if cold {
                    let (file, offset) = (this.region.file.clone(), this.region.start);
                    let mut loading = tokio::task::spawn_blocking(move || load(&file, offset, len));
                    if Pin::new(&mut loading).poll(cx).is_pending() {
                        this.loading = Some(loading);
                        return Poll::Pending;
                    }
                }
            }
        }
        let piece = Piece {
            file: this.region.file.clone(),
            offset: this.region.start,
            len,
            sent: 0,
            served: this.served.clone(),
            first: this.first,
        };
        this.first = false;
        this.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(piece);
        this.region.start += len as u64;
        this.region.len -= len as u64;
        this.yield_next = true;
        if this.read_ahead {
            advise_read(&this.region.file, this.region.start, this.region.len);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &PLACEHOLDER[..len],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.region.len == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.region.len)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::net::SocketAddr;

    use hyper::body::Incoming;
    use hyper::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::response;
    use crate::serve::{accept_loop, Connection, ServerOptions};

    /// Bytes that differ at every position, so a placeholder (zeros) or a shifted piece shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A server on the real accept loop whose every GET is answered from `file` the way blob
    /// handlers answer: `/whole` the whole file, `/from/<a>/<b>` the bytes `[a, b)`.
    async fn server(file: Arc<File>, size: u64) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let handler = move |req: Request<Incoming>, conn: Connection| {
            let file = file.clone();
            async move {
                let path = req.uri().path().to_owned();
                let (start, end) = match path.strip_prefix("/from/") {
                    Some(r) => {
                        let (a, b) = r.split_once('/').expect("range path");
                        (a.parse().expect("start"), b.parse().expect("end"))
                    }
                    None => (0, size),
                };
                let mut resp = Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_LENGTH, end - start)
                    // The streaming body is never used on a plain HTTP/1 connection: make it
                    // wrong, so that a response that took it shows.
                    .body(response::full(vec![b'!'; (end - start) as usize]))
                    .expect("response");
                resp.extensions_mut().insert(FileRegion {
                    file,
                    start,
                    len: end - start,
                });
                match &conn.files {
                    Some(files) => files.send(resp, None),
                    None => resp,
                }
            }
        };
        tokio::spawn(async move {
            let options = ServerOptions::default();
            let _ = accept_loop(listener, &options, std::future::pending(), handler).await;
        });
        addr
    }

    fn stored(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write");
        let file = Arc::new(File::open(f.path()).expect("open"));
        (f, file)
    }

    /// Reads one response: its status line and its body as its Content-Length announced
    /// (`Err` with what arrived when the connection ended before).
    async fn read_response(conn: &mut TcpStream) -> Result<(String, Vec<u8>), Vec<u8>> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            match conn.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return Err(head),
            }
        }
        let head = String::from_utf8(head).expect("head is text");
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .expect("content-length")
            .trim()
            .parse()
            .expect("length");
        let mut body = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match conn.read(&mut body[got..]).await {
                Ok(0) | Err(_) => {
                    body.truncate(got);
                    return Err(body);
                }
                Ok(n) => got += n,
            }
        }
        let status = head.lines().next().unwrap_or_default().to_owned();
        Ok((status, body))
    }

    #[tokio::test]
    async fn files_reach_the_client_whole_and_in_ranges_over_one_connection() {
        // Larger than two pieces, so that a response is several placeholder frames.
        let bytes = pattern(2 * PIECE + 12_345);
        let (_keep, file) = stored(&bytes);
        let addr = server(file, bytes.len() as u64).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        let ranges = [
            (0, bytes.len()),
            (1, 2),
            (PIECE - 3, PIECE + 5),
            (12_345, 2 * PIECE),
            (0, bytes.len()),
        ];
        for (a, b) in ranges {
            let path = if (a, b) == (0, bytes.len()) {
                "/whole".to_owned()
            } else {
                format!("/from/{a}/{b}")
            };
            conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .expect("request");
            let (status, body) = read_response(&mut conn).await.expect("whole response");
            assert!(status.contains("200"), "{status}");
            assert!(
                body == bytes[a..b],
                "bytes [{a}, {b}) differ from the file's"
            );
        }
    }

    #[tokio::test]
    async fn pipelined_requests_get_their_own_bytes_in_order() {
        let bytes = pattern(PIECE + 777);
        let (_keep, file) = stored(&bytes);
        let addr = server(file, bytes.len() as u64).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        let ranges = [
            (10, 20),
            (0, PIECE + 777),
            (500, 70_000),
            (PIECE, PIECE + 1),
        ];
        let mut requests = String::new();
        for (a, b) in ranges {
            requests.push_str(&format!("GET /from/{a}/{b} HTTP/1.1\r\nhost: x\r\n\r\n"));
        }
        conn.write_all(requests.as_bytes()).await.expect("requests");
        for (a, b) in ranges {
            let (_, body) = read_response(&mut conn).await.expect("whole response");
            assert!(
                body == bytes[a..b],
                "bytes [{a}, {b}) differ from the file's"
            );
        }
    }

    #[tokio::test]
    async fn a_file_removed_while_sent_is_sent_whole() {
        let bytes = pattern(3 * PIECE);
        let (keep, file) = stored(&bytes);
        let addr = server(file, bytes.len() as u64).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        let mut first = vec![0u8; 1000];
        conn.read_exact(&mut first).await.expect("first bytes");
        keep.close().expect("unlink");
        let mut rest = Vec::new();
        let mut whole = first;
        // What is left of the head and the body, up to the body's end.
        let head_end = whole
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("head within the first bytes")
            + 4;
        let want = head_end + bytes.len();
        while whole.len() + rest.len() < want {
            let mut buf = vec![0u8; 64 * 1024];
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "connection ended early");
            rest.extend_from_slice(&buf[..n]);
        }
        whole.extend_from_slice(&rest);
        assert!(whole[head_end..] == bytes[..], "body differs from the file");
    }

    #[tokio::test]
    async fn a_file_truncated_behind_piers_back_ends_the_connection_short() {
        let bytes = pattern(2 * PIECE);
        let (keep, file) = stored(&bytes);
        let addr = server(file, bytes.len() as u64).await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(keep.path())
            .and_then(|f| f.set_len(PIECE as u64 / 2))
            .expect("truncate");
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        let short = read_response(&mut conn).await.expect_err("a short body");
        assert!(short.len() <= PIECE / 2, "more bytes than the file holds");
        assert!(
            short == bytes[..short.len()],
            "the bytes sent are the file's"
        );
        // The server carries on.
        let mut again = TcpStream::connect(addr).await.expect("connect");
        again
            .write_all(b"GET /from/0/100 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        let (_, body) = read_response(&mut again).await.expect("whole response");
        assert!(body == bytes[..100]);
    }

    #[tokio::test]
    async fn placeholder_bytes_out_of_step_are_refused_not_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let (mut socket, files) = Socket::new(accepted);
        // Nothing queued.
        let e = socket
            .write_vectored(&[IoSlice::new(&PLACEHOLDER[..10])])
            .await
            .expect_err("no file queued");
        assert_eq!(e.kind(), io::ErrorKind::Other);
        // A piece queued, but the slice claims to start elsewhere in it, or to be longer.
        let (_keep, file) = stored(&pattern(100));
        files
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Piece {
                file,
                offset: 0,
                len: 100,
                sent: 0,
                served: None,
                first: true,
            });
        for slice in [&PLACEHOLDER[5..20], &PLACEHOLDER[..101]] {
            let e = socket
                .write_vectored(&[IoSlice::new(slice)])
                .await
                .expect_err("out of step");
            assert_eq!(e.kind(), io::ErrorKind::Other);
        }
        drop(client);
    }

    // ---- review: hostile clients and odd responses ----

    /// A listener whose accepted sockets get `sndbuf` (Linux copies the listener's buffer sizes
    /// to the sockets it accepts), so that a test can make the server's writes partial.
    fn listener_with(sndbuf: Option<u32>) -> TcpListener {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(size) = sndbuf {
            socket.set_send_buffer_size(size).expect("SO_SNDBUF");
        }
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        socket.listen(128).expect("listen")
    }

    /// A client that stops reading is counted for what its socket took, not for the whole
    /// piece its body frame stood for; one that reads to the end, for every byte once.
    #[tokio::test]
    async fn served_bytes_are_counted_as_the_socket_takes_them() {
        let data = pattern(4 * PIECE + 1000);
        let mut tmp = tempfile::tempfile().expect("temporary file");
        tmp.write_all(&data).expect("write");
        let (file, size) = (Arc::new(tmp), data.len() as u64);
        // A small send buffer (accepted sockets inherit it), so that a stalled client holds up
        // the server well before a piece is through.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(32 * 1024).expect("SO_SNDBUF");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let listener = socket.listen(16).expect("listen");
        let addr = listener.local_addr().expect("address");
        let served = IntCounter::new("served", "test").expect("counter");
        let counter = served.clone();
        let handler = move |_req: Request<Incoming>, conn: Connection| {
            let (file, counter) = (file.clone(), counter.clone());
            async move {
                let mut resp = Response::new(response::empty());
                resp.extensions_mut().insert(FileRegion {
                    file,
                    start: 0,
                    len: size,
                });
                match &conn.files {
                    Some(files) => files.send(resp, Some(counter)),
                    None => resp,
                }
            }
        };
        tokio::spawn(async move {
            let options = ServerOptions::default();
            let _ = accept_loop(listener, &options, std::future::pending(), handler).await;
        });
        let mut conn = connect_with(addr, 16 * 1024).await;
        conn.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut some = vec![0u8; 64 * 1024];
        conn.read_exact(&mut some).await.expect("the first bytes");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let stalled = served.get();
        assert!(
            (64 * 1024..PIECE as u64).contains(&stalled),
            "counted {stalled} bytes for a client that read 64 KiB and stalled"
        );
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.ok();
        let head_and_body = (some.len() + rest.len()) as u64;
        assert!(
            head_and_body > size,
            "the whole body follows: {head_and_body} bytes"
        );
        assert_eq!(served.get(), size, "every byte counted once");
    }

    /// A client whose receive buffer is `rcvbuf`.
    async fn connect_with(addr: SocketAddr, rcvbuf: u32) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        socket.connect(addr).await.expect("connect")
    }

    /// A server on the real accept loop with more routes than [`server`]:
    ///
    /// - `/whole`, `/from/<a>/<b>`: as [`server`] (for HEAD too: hyper must not poll the body);
    /// - `/chunked`: the whole file with no `Content-Length` header;
    /// - `/small`: five plain bytes, no file;
    /// - `/mem`: the file's bytes from memory, no file (hyper's streaming path);
    /// - any POST: the request body read whole, answered with its length.
    async fn review_server(
        file: Arc<File>,
        bytes: Arc<Vec<u8>>,
        listener: TcpListener,
        options: ServerOptions,
    ) -> SocketAddr {
        let addr = listener.local_addr().expect("address");
        let size = bytes.len() as u64;
        let handler = move |req: Request<Incoming>, conn: Connection| {
            let (file, bytes) = (file.clone(), bytes.clone());
            async move {
                let files = conn.files.clone();
                let path = req.uri().path().to_owned();
                if req.method() == http::Method::POST {
                    let got = req.into_body().collect().await.map(|b| b.to_bytes().len());
                    let text = format!("{got:?}");
                    return Response::builder()
                        .header(http::header::CONTENT_LENGTH, text.len())
                        .body(response::full(text))
                        .expect("response");
                }
                if path == "/small" {
                    return Response::builder()
                        .header(http::header::CONTENT_LENGTH, 5)
                        .body(response::full(&b"small"[..]))
                        .expect("response");
                }
                if path == "/mem" {
                    return Response::builder()
                        .header(http::header::CONTENT_LENGTH, bytes.len())
                        .body(response::full(bytes.to_vec()))
                        .expect("response");
                }
                let (start, end, length) = if let Some(r) = path.strip_prefix("/from/") {
                    let (a, b) = r.split_once('/').expect("range path");
                    let (a, b): (u64, u64) = (a.parse().expect("start"), b.parse().expect("end"));
                    (a, b, Some(b - a))
                } else if path == "/chunked" {
                    (0, size, None)
                } else {
                    (0, size, Some(size))
                };
                let mut builder = Response::builder().status(StatusCode::OK);
                if let Some(length) = length {
                    builder = builder.header(http::header::CONTENT_LENGTH, length);
                }
                let mut resp = builder
                    .body(response::full(vec![b'!'; (end - start) as usize]))
                    .expect("response");
                resp.extensions_mut().insert(FileRegion {
                    file,
                    start,
                    len: end - start,
                });
                match files {
                    Some(files) => files.send(resp, None),
                    None => resp,
                }
            }
        };
        tokio::spawn(async move {
            let _ = accept_loop(listener, &options, std::future::pending(), handler).await;
        });
        addr
    }

    async fn review_setup(len: usize) -> (tempfile::NamedTempFile, Arc<File>, Vec<u8>, SocketAddr) {
        let bytes = pattern(len);
        let (keep, file) = stored(&bytes);
        let addr = review_server(
            file.clone(),
            Arc::new(bytes.clone()),
            listener_with(None),
            ServerOptions::default(),
        )
        .await;
        (keep, file, bytes, addr)
    }

    /// Reads a response head (up to its blank line), `None` when the connection ended first.
    async fn read_head(conn: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            match conn.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return None,
            }
        }
        Some(String::from_utf8(head).expect("head is text"))
    }

    #[tokio::test]
    async fn head_requests_for_files_queue_nothing_and_the_next_get_is_whole() {
        let (_keep, _file, bytes, addr) = review_setup(PIECE + 99).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        for path in ["/whole", "/from/5/500"] {
            conn.write_all(format!("HEAD {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .expect("request");
            let head = read_head(&mut conn).await.expect("a head");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        conn.write_all(b"GET /from/7/70007 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        let (_, body) = read_response(&mut conn).await.expect("whole response");
        assert!(body == bytes[7..70_007], "bytes after HEADs differ");
    }

    /// A file response without a `Content-Length` header: hyper frames it by the body's exact
    /// size (not chunked), and the bytes are the file's.
    #[tokio::test]
    async fn a_file_without_content_length_is_framed_by_its_size() {
        let (_keep, _file, bytes, addr) = review_setup(2 * PIECE + 5).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(
            b"GET /chunked HTTP/1.1\r\nhost: x\r\n\r\nGET /from/1/11 HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .expect("requests");
        let (_, body) = read_response(&mut conn).await.expect("whole response");
        assert!(body == bytes, "body differs from the file");
        let (_, body) = read_response(&mut conn).await.expect("whole response");
        assert!(body == bytes[1..11]);
    }

    #[tokio::test]
    async fn http_1_0_clients_get_the_files_bytes_then_a_close() {
        let (_keep, _file, bytes, addr) = review_setup(PIECE + 1234).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /whole HTTP/1.0\r\n\r\n")
            .await
            .expect("request");
        let mut all = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            conn.read_to_end(&mut all),
        )
        .await
        .expect("the server closes an HTTP/1.0 connection")
        .expect("read");
        let at = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        assert!(
            all[at..] == bytes[..],
            "HTTP/1.0 body differs from the file"
        );
        // And with keep-alive asked for, the next request is answered whole too.
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /from/0/9 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /from/9/99 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .expect("requests");
        for (a, b) in [(0, 9), (9, 99)] {
            let (status, body) = read_response(&mut conn).await.expect("whole response");
            assert!(status.starts_with("HTTP/1.0 200"), "{status}");
            assert!(body == bytes[a..b]);
        }
    }

    #[tokio::test]
    async fn an_empty_file_sends_no_body_and_keeps_the_connection_in_step() {
        let (_keep, file) = stored(b"");
        let addr = review_server(
            file,
            Arc::new(Vec::new()),
            listener_with(None),
            ServerOptions::default(),
        )
        .await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        for _ in 0..3 {
            conn.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("request");
            let (status, body) = read_response(&mut conn).await.expect("whole response");
            assert!(status.contains("200"), "{status}");
            assert!(body.is_empty());
        }
        conn.write_all(b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        let (_, body) = read_response(&mut conn).await.expect("whole response");
        assert_eq!(body, b"small");
    }

    /// A mix of files, ranges, plain answers, HEADs and a POST, pipelined in one write.
    #[tokio::test]
    async fn pipelined_files_plain_answers_heads_and_bodies_stay_in_step() {
        let (_keep, _file, bytes, addr) = review_setup(PIECE + 4321).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        let requests = "GET /from/3/4 HTTP/1.1\r\nhost: x\r\n\r\n\
            GET /small HTTP/1.1\r\nhost: x\r\n\r\n\
            HEAD /whole HTTP/1.1\r\nhost: x\r\n\r\n\
            GET /whole HTTP/1.1\r\nhost: x\r\n\r\n\
            POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc\
            GET /mem HTTP/1.1\r\nhost: x\r\n\r\n\
            GET /from/1048575/1048577 HTTP/1.1\r\nhost: x\r\n\r\n";
        conn.write_all(requests.as_bytes()).await.expect("requests");
        let (_, body) = read_response(&mut conn).await.expect("range");
        assert!(body == bytes[3..4]);
        let (_, body) = read_response(&mut conn).await.expect("small");
        assert_eq!(body, b"small");
        let head = read_head(&mut conn).await.expect("HEAD");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let (_, body) = read_response(&mut conn).await.expect("whole");
        assert!(body == bytes, "whole file differs");
        let (_, body) = read_response(&mut conn).await.expect("POST");
        assert_eq!(body, b"Ok(3)");
        let (_, body) = read_response(&mut conn).await.expect("mem");
        assert!(body == bytes, "streamed bytes differ");
        let (_, body) = read_response(&mut conn).await.expect("range across pieces");
        assert!(body == bytes[PIECE - 1..PIECE + 1]);
    }

    /// With a write buffer larger than a piece, hyper queues several placeholder frames before
    /// writing any: each must still be sent from its own piece.
    #[tokio::test]
    async fn several_pieces_queued_at_once_are_sent_in_order() {
        let bytes = pattern(4 * PIECE + 17);
        let (_keep, file) = stored(&bytes);
        let options = ServerOptions {
            max_header_bytes: 8 * PIECE,
            ..ServerOptions::default()
        };
        let addr = review_server(
            file,
            Arc::new(bytes.clone()),
            listener_with(Some(64 * 1024)),
            options,
        )
        .await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\nGET /from/100/3145828 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("requests");
        let (_, body) = read_response(&mut conn).await.expect("whole");
        assert!(body == bytes, "whole file differs");
        let (_, body) = read_response(&mut conn).await.expect("range");
        assert!(body == bytes[100..3_145_828], "range differs");
    }

    /// A client that reads a few bytes at a time through a small window: every `sendfile` is
    /// partial, and each resumes where the last stopped.
    #[tokio::test]
    async fn a_slow_reader_through_a_small_window_gets_every_byte() {
        let bytes = pattern(PIECE + PIECE / 2);
        let (_keep, file) = stored(&bytes);
        let addr = review_server(
            file,
            Arc::new(bytes.clone()),
            listener_with(Some(4096)),
            ServerOptions::default(),
        )
        .await;
        let mut conn = connect_with(addr, 4096).await;
        conn.write_all(
            b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\nGET /from/77/177 HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .expect("requests");
        let mut all = Vec::new();
        let mut buf = [0u8; 3000];
        let head = b"HTTP/1.1 200 OK\r\n".len();
        while all.len() < bytes.len() + 2 * head {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "connection ended early");
            all.extend_from_slice(&buf[..n]);
            if all.len() % 7 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            if all.len() > bytes.len() + 400 && all.ends_with(&bytes[77..177]) {
                break;
            }
        }
        let at = all.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
        assert!(all[at..at + bytes.len()] == bytes[..], "body differs");
        assert!(all.ends_with(&bytes[77..177]), "second body differs");
    }

    /// A client that stops reading in the middle of a file holds its own connection only.
    #[tokio::test]
    async fn a_client_that_stops_reading_does_not_stall_other_connections() {
        let (_keep, _file, bytes, addr) = review_setup(8 * PIECE).await;
        let mut stalled = Vec::new();
        for _ in 0..4 {
            let mut conn = connect_with(addr, 4096).await;
            conn.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("request");
            stalled.push(conn);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let fetch = async {
            let mut conn = TcpStream::connect(addr).await.expect("connect");
            conn.write_all(
                b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\nGET /small HTTP/1.1\r\nhost: x\r\n\r\n",
            )
            .await
            .expect("request");
            let (_, body) = read_response(&mut conn).await.expect("whole");
            let (_, small) = read_response(&mut conn).await.expect("small");
            (body, small)
        };
        let (body, small) = tokio::time::timeout(std::time::Duration::from_secs(10), fetch)
            .await
            .expect("another connection is served while others stall");
        assert!(body == bytes);
        assert_eq!(small, b"small");
        drop(stalled);
    }

    /// A client that resets its connection in the middle of a file: the server carries on, and
    /// the connection's queued pieces (and their file) are let go.
    #[tokio::test]
    async fn a_client_that_resets_mid_file_releases_the_file() {
        let (_keep, file, bytes, addr) = review_setup(4 * PIECE).await;
        let baseline = Arc::strong_count(&file);
        for _ in 0..5 {
            let mut conn = connect_with(addr, 4096).await;
            conn.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("request");
            let mut some = [0u8; 2000];
            conn.read_exact(&mut some).await.expect("some bytes");
            conn.set_zero_linger().expect("SO_LINGER 0");
            drop(conn);
        }
        let mut released = false;
        for _ in 0..200 {
            if Arc::strong_count(&file) == baseline {
                released = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            released,
            "{} references to the file remain after the clients left",
            Arc::strong_count(&file) - baseline
        );
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        let (_, body) = read_response(&mut conn).await.expect("whole");
        assert!(body == bytes);
    }

    /// How long a small plain answer takes after a file on the same keep-alive connection:
    /// `TCP_CORK` must be lifted once the file's bytes left, or the answer waits ~200 ms.
    async fn small_after(addr: SocketAddr, first: &str, rounds: usize) -> std::time::Duration {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.set_nodelay(true).expect("nodelay");
        let mut worst = std::time::Duration::ZERO;
        for _ in 0..rounds {
            conn.write_all(format!("GET {first} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .expect("request");
            read_response(&mut conn).await.expect("file");
            let started = std::time::Instant::now();
            conn.write_all(b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("request");
            let (_, small) = read_response(&mut conn).await.expect("small");
            assert_eq!(small, b"small");
            worst = worst.max(started.elapsed());
        }
        worst
    }

    #[tokio::test]
    async fn cork_is_lifted_after_a_file_so_the_next_small_answer_is_not_held() {
        let (_keep, _file, _bytes, addr) = review_setup(2 * PIECE + 333).await;
        for first in ["/whole", "/from/0/1", "/from/10/1048600", "/chunked"] {
            let worst = small_after(addr, first, 5).await;
            assert!(
                worst < std::time::Duration::from_millis(150),
                "a small answer after {first} took {worst:?}"
            );
        }
    }

    /// A pipelined request with `Expect: 100-continue` whose body the handler reads, arriving
    /// while the end of a file is still queued: hyper writes an automatic `100 Continue` into its
    /// head buffer, which goes out before anything queued; it must wait until the file's bytes
    /// left (hyper goes idle only once its write buffer is flushed).
    async fn expect_continue_behind(path: &str) -> Result<(), String> {
        let bytes = pattern(3 * PIECE);
        let (_keep, file) = stored(&bytes);
        let addr = review_server(
            file,
            Arc::new(bytes.clone()),
            listener_with(Some(32 * 1024)),
            ServerOptions::default(),
        )
        .await;
        let mut conn = connect_with(addr, 16 * 1024).await;
        let requests = format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n\
             POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\nhello"
        );
        conn.write_all(requests.as_bytes()).await.expect("requests");
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        let read_all = async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
                if all.ends_with(b"Ok(5)") {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(20), read_all).await;
        let Some(at) = all.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Err("no head".into());
        };
        let body_end = at + 4 + bytes.len();
        if all.len() < body_end {
            return Err(format!(
                "the body was cut after {} of {} bytes",
                all.len() - at - 4,
                bytes.len()
            ));
        }
        if all[at + 4..body_end] != bytes[..] {
            let first = all[at + 4..body_end]
                .iter()
                .zip(&bytes)
                .position(|(a, b)| a != b)
                .unwrap_or_default();
            return Err(format!("the body differs from byte {first}"));
        }
        let rest = String::from_utf8_lossy(&all[body_end..]).into_owned();
        if !rest.ends_with("Ok(5)") {
            return Err(format!("second answer: {rest:?}"));
        }
        Ok(())
    }

    #[tokio::test]
    async fn expect_continue_pipelined_behind_a_file_keeps_the_file_whole() {
        expect_continue_behind("/whole")
            .await
            .expect("file body whole");
    }

    #[tokio::test]
    async fn expect_continue_pipelined_behind_a_streamed_body_keeps_it_whole() {
        expect_continue_behind("/mem")
            .await
            .expect("streamed body whole");
    }

    /// The socket's own bookkeeping, driven directly: plain bytes around a placeholder go out in
    /// order, a placeholder out of step after plain bytes sends the plain bytes only, and the
    /// queue is popped exactly when a piece is sent whole.
    #[tokio::test]
    async fn writes_around_placeholders_keep_order_and_refuse_out_of_step_pieces() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let (mut socket, files) = Socket::new(accepted);
        let bytes = pattern(300);
        let (_keep, file) = stored(&bytes);
        let queue = |offset: u64, len: usize, first: bool| {
            files
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back(Piece {
                    file: file.clone(),
                    offset,
                    len,
                    sent: 0,
                    served: None,
                    first,
                });
        };
        // A response's first piece goes corked with its head; with the next piece already
        // queued behind it (a client slower than the socket), the cork stays on.
        queue(200, 50, true);
        queue(10, 100, false);
        let n = socket
            .write_vectored(&[IoSlice::new(b"head"), IoSlice::new(&PLACEHOLDER[..50])])
            .await
            .expect("write");
        assert_eq!(n, 54);
        assert!(socket.corked, "cork kept while a piece is queued");
        // Head, placeholder, tail in one call: head and file bytes, the tail left for later.
        let n = socket
            .write_vectored(&[
                IoSlice::new(b"head"),
                IoSlice::new(&PLACEHOLDER[..100]),
                IoSlice::new(b"tail"),
            ])
            .await
            .expect("write");
        assert_eq!(n, 104);
        assert!(files
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty());
        assert!(!socket.corked, "cork lifted once the queue emptied");
        socket.write_all(b"tail").await.expect("tail");
        // A piece queued, then plain bytes followed by a placeholder that does not match it:
        // the plain bytes go, the placeholder is refused on its own turn.
        queue(0, 50, false);
        let n = socket
            .write_vectored(&[IoSlice::new(b"more"), IoSlice::new(&PLACEHOLDER[1..40])])
            .await
            .expect("the plain bytes are written");
        assert_eq!(n, 4);
        let e = socket
            .write_vectored(&[IoSlice::new(&PLACEHOLDER[1..40])])
            .await
            .expect_err("out of step");
        assert_eq!(e.kind(), io::ErrorKind::Other);
        drop(socket);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        let mut want = b"head".to_vec();
        want.extend_from_slice(&bytes[200..250]);
        want.extend_from_slice(b"head");
        want.extend_from_slice(&bytes[10..110]);
        want.extend_from_slice(b"tailmore");
        assert!(got == want, "{:?}", String::from_utf8_lossy(&got));
    }

    #[test]
    fn placeholder_slices_are_recognised_by_address_only() {
        assert_eq!(placeholder_offset(&PLACEHOLDER[..10]), Some(0));
        assert_eq!(placeholder_offset(&PLACEHOLDER[100..200]), Some(100));
        assert_eq!(
            placeholder_offset(&PLACEHOLDER[PIECE - 1..]),
            Some(PIECE - 1)
        );
        // Zeros elsewhere are ordinary bytes.
        let zeros = vec![0u8; 64];
        assert_eq!(placeholder_offset(&zeros), None);
        assert_eq!(placeholder_offset(b"HTTP/1.1 200 OK\r\n"), None);
    }
}
