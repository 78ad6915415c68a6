//! Reading a byte range of a blob file, optionally following a fill as the file grows.
//!
//! Memory per stream is bounded by [`CHUNK`], whatever the size of the blob: each stream reads
//! into one buffer of its own, which it takes back once hyper wrote out (and dropped) the chunks
//! cut from it. A thousand streams hold a thousand such buffers at most (plus what hyper queues
//! per connection), not a thousand blobs' worth.
//!
//! A read first asks the kernel for bytes already in the page cache (`preadv2` with
//! `RWF_NOWAIT`) on the runtime's thread; only bytes that would wait for the disk are read on
//! the blocking pool. A warm cache thus costs no thread hop per chunk.

use std::fs::File;
use std::io;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, StreamExt};
use rustix::io::{Errno, ReadWriteFlags};
use tokio::sync::watch;

use crate::fill::{Phase, Progress};

/// Largest read, and so the largest chunk a stream yields: small enough that a thousand
/// concurrent streams cost little memory and that the buffer stays in the CPU's cache, large
/// enough that the per-chunk work (a system call, a frame through hyper) costs little per byte.
pub(crate) const CHUNK: usize = 32 * 1024;

/// Bytes a stream reads without a thread hop before it lets the runtime's other tasks run: reads
/// from the page cache never wait, so without this one download would fill its socket for as long
/// as the socket takes bytes, while a thousand small requests wait behind it.
const TURN: u64 = 8 * CHUNK as u64;

/// Where a stream is.
struct State {
    file: Arc<File>,
    pos: u64,
    end: Option<u64>,
    progress: Option<watch::Receiver<Progress>>,
    /// The stream's read buffer; each chunk is split off it.
    buf: BytesMut,
    /// Whether page-cache reads on the runtime's thread are worth trying (the file system
    /// supports them).
    nowait: bool,
    /// Bytes read on the runtime's thread since the stream last yielded.
    turn: u64,
}

/// A stream of the bytes `[start, end)` of `file`. With `progress`, bytes are read only once the
/// fill wrote them, and the stream ends in an error if the fill fails.
pub(crate) fn file_range(
    file: Arc<File>,
    start: u64,
    end: Option<u64>,
    progress: Option<watch::Receiver<Progress>>,
) -> BoxStream<'static, io::Result<Bytes>> {
    let state = State {
        file,
        pos: start,
        end,
        progress,
        buf: BytesMut::new(),
        nowait: true,
        turn: 0,
    };
    stream::unfold(state, |mut s| async move {
        // How far the file may be read now, and where this stream ends.
        let (avail, end) = loop {
            let Some(rx) = s.progress.as_mut() else {
                let end = s.end.unwrap_or(u64::MAX);
                break (end, end);
            };
            let p = rx.borrow_and_update().clone();
            let (avail, end) = match &p.phase {
                Phase::Failed(e) => return Some((Err(io::Error::other(e.to_string())), s)),
                Phase::Verified | Phase::Complete => {
                    (p.written, s.end.unwrap_or(p.written).min(p.written))
                }
                // The blob's last byte goes out only after its digest verified, so a client never
                // receives a complete body with wrong bytes.
                _ => (
                    p.written.saturating_sub(1),
                    s.end.or(p.total).unwrap_or(u64::MAX),
                ),
            };
            if s.pos >= end || avail > s.pos {
                break (avail, end);
            }
            if rx.changed().await.is_err() {
                return Some((Err(io::Error::other("fill ended without completing")), s));
            }
        };
        if s.pos >= end {
            return None;
        }
        let len = avail.min(end).saturating_sub(s.pos).min(CHUNK as u64) as usize;
        match read_chunk(&mut s, len).await {
            Ok(b) if b.is_empty() => {
                // A verified file ended before its recorded size: never pass that off as the blob.
                Some((
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file shorter than expected",
                    )),
                    s,
                ))
            }
            Ok(b) => {
                s.pos += b.len() as u64;
                Some((Ok(b), s))
            }
            Err(e) => Some((Err(e), s)),
        }
    })
    .boxed()
}

/// Reads up to `len` bytes at the stream's position into its buffer, and cuts them off as a
/// chunk. Empty at the end of the file.
async fn read_chunk(s: &mut State, len: usize) -> io::Result<Bytes> {
    // Takes the allocation back when every chunk cut from it was dropped; else a new one.
    s.buf.reserve(len);
    s.buf.resize(len, 0);
    let mut n = 0;
    if s.turn >= TURN {
        s.turn = 0;
        tokio::task::yield_now().await;
    }
    if s.nowait {
        match rustix::io::preadv2(
            &*s.file,
            &mut [IoSliceMut::new(&mut s.buf[..])],
            s.pos,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(read) => {
                n = read;
                s.turn += read as u64;
            }
            // Not in the page cache (or an interrupted call): the blocking pool reads it.
            Err(Errno::AGAIN | Errno::INTR) => {}
            // No such flag here: blocking reads from now on.
            Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => s.nowait = false,
            Err(e) => return Err(e.into()),
        }
    }
    if n == 0 {
        // Not cached, or the end of the file (the blocking read tells which).
        let (file, pos) = (s.file.clone(), s.pos);
        let mut buf = std::mem::take(&mut s.buf);
        let (back, read) = tokio::task::spawn_blocking(move || {
            let read = file.read_at(&mut buf[..], pos);
            (buf, read)
        })
        .await
        .map_err(io::Error::other)?;
        s.buf = back;
        n = read?;
    }
    s.buf.truncate(n);
    Ok(s.buf.split().freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        (f, data)
    }

    #[tokio::test]
    async fn a_large_file_is_read_in_bounded_chunks() {
        let (f, data) = file_of(3 * 1024 * 1024 + 5);
        let file = Arc::new(File::open(f.path()).unwrap());
        let mut s = file_range(file, 0, Some(data.len() as u64), None);
        let mut got = Vec::new();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.unwrap();
            // The bug this guards: memory per reader growing with the read (1 MiB per chunk).
            assert!(chunk.len() <= CHUNK, "a chunk of {} bytes", chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert!(got == data);
    }

    #[tokio::test]
    async fn a_stream_reuses_its_buffer_once_chunks_are_dropped() {
        let (f, data) = file_of(16 * CHUNK);
        let file = Arc::new(File::open(f.path()).unwrap());
        let mut s = file_range(file, 100, Some(data.len() as u64), None);
        let mut first = None;
        let mut got = Vec::new();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.unwrap();
            // Every chunk lands in the same allocation: one buffer per stream, whatever its length.
            assert_eq!(*first.get_or_insert(chunk.as_ptr()), chunk.as_ptr());
            got.extend_from_slice(&chunk);
        }
        assert!(got == data[100..]);
    }

    #[tokio::test]
    async fn a_file_shorter_than_announced_ends_in_an_error() {
        let (f, data) = file_of(CHUNK + 10);
        let file = Arc::new(File::open(f.path()).unwrap());
        let mut s = file_range(file, 0, Some(data.len() as u64 + 1), None);
        let mut read = 0;
        let err = loop {
            match s.next().await.unwrap() {
                Ok(chunk) => read += chunk.len(),
                Err(e) => break e,
            }
        };
        assert_eq!(read, data.len());
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
