//! Reading a byte range of a blob file, optionally following a fill as the file grows.

use std::fs::File;
use std::io;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::watch;

use crate::fill::{Phase, Progress};

/// Size of one read while following a fill: small enough that readers keep close behind it.
const FOLLOW_CHUNK: u64 = 256 * 1024;
/// Size of one read of a complete file: large, so that the blocking-pool hop and the allocation
/// of each read cost little per byte.
const FILE_CHUNK: u64 = 1024 * 1024;

/// A stream of the bytes `[start, end)` of `file`. With `progress`, bytes are read only once the
/// fill wrote them, and the stream ends in an error if the fill fails.
pub(crate) fn file_range(
    file: Arc<File>,
    start: u64,
    end: Option<u64>,
    progress: Option<watch::Receiver<Progress>>,
) -> BoxStream<'static, io::Result<Bytes>> {
    struct State {
        file: Arc<File>,
        pos: u64,
        end: Option<u64>,
        progress: Option<watch::Receiver<Progress>>,
    }
    let state = State {
        file,
        pos: start,
        end,
        progress,
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
        let chunk = if s.progress.is_some() {
            FOLLOW_CHUNK
        } else {
            FILE_CHUNK
        };
        let len = avail.min(end).saturating_sub(s.pos).min(chunk);
        let (file, pos, following) = (s.file.clone(), s.pos, s.progress.is_some());
        let read = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let mut buf = Vec::with_capacity(len as usize);
            if following {
                // The fill's descriptor is shared by all its readers: positional reads.
                buf.resize(len as usize, 0);
                let n = file.read_at(&mut buf, pos)?;
                buf.truncate(n);
            } else {
                // A complete file opened for this stream alone: read into the buffer's
                // uninitialised capacity, sparing a memset per chunk.
                let mut f = &*file;
                f.seek(SeekFrom::Start(pos))?;
                f.take(len).read_to_end(&mut buf)?;
            }
            Ok(Bytes::from(buf))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        match read {
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
