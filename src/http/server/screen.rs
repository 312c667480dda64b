//! Screens HTTP/1 request heads on the wire, before hyper parses them, for the refusals hyper
//! cannot answer in the sidecar's JSON error form.
//!
//! hyper answers a head it cannot parse (too many headers, too long, malformed) with its own
//! status and an empty body, and serves a request that carries both `Content-Length` and
//! `Transfer-Encoding` by the chunked framing alone (RFC 9112 §6.3 allows that, and allows
//! refusing it: such a request is a smuggling shape, and refusing it is the answer that cannot be
//! misread by anything in between). Neither case reaches a service.
//!
//! [`HeadScreen`] sits between the socket and hyper and follows the byte stream exactly as
//! hyper's HTTP/1 parser does: each request head is parsed with the same parser (`httparse`,
//! same settings, same header limit) once it is complete, then its body is skipped by the same
//! framing rules (a length, or chunks read the way hyper reads them). An incomplete head is held
//! back until it is complete, so hyper is only ever handed whole heads. A head to refuse is
//! replaced by a stand-in head (`GET / HTTP/1.1`, `Connection: close`) and its refusal is put in
//! a [`RefusalSlot`] under its position on the connection; the connection's service answers the
//! stand-in with the refusal as a JSON error, hyper closes the connection after it, and nothing
//! after the refused head is read. (Were the positions ever to disagree, the stand-in reaching
//! the service would be refused there for its missing Host: still a 4xx, never a served request.)
//!
//! The screen refuses only what hyper would refuse too (same parser, same limits, except a head
//! larger than [`MAX_HEAD_BYTES`], far below hyper's buffer), plus the two-framings request.
//! Wherever it cannot follow the stream with certainty (HTTP/2, a chunked body that does not
//! parse) it stops screening that connection and passes bytes through: hyper alone judges them,
//! as it did before. It never changes a byte of a request it lets through.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::error::Refusal;
use crate::http::{MAX_HEADERS, MAX_HEAD_BYTES};

/// What the screen reads from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// The head hyper is handed in place of a refused one: no body, and the connection closes after
/// its answer.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n";

/// HTTP/2's connection preface: a connection that starts with it is not screened.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// After refusing, how long the screen keeps reading (and dropping) what the client still sends
/// before closing: closing with unread bytes would reset the connection and could destroy the
/// answer before the client reads it.
const LINGER: Duration = Duration::from_secs(1);

/// Where a connection's screen leaves its refusal for the connection's service: which request
/// on the connection (counting from 1) is the stand-in, and why. Set at most once: nothing is
/// read after a refused head.
pub type RefusalSlot = Arc<OnceLock<(u64, Refusal)>>;

/// What to do with the bytes at the front of what [`Framing::step`] was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Hand this many bytes to hyper.
    Pass(usize),
    /// The bytes are the start of a request head: hold them until more arrive.
    Hold,
    /// The head at the front is refused.
    Refuse(Refusal),
}

/// A place in a chunked body, named as hyper's decoder names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk's size: a hex digit must come.
    Start,
    /// In the size's hex digits.
    Size(u64),
    /// Spaces after the size.
    SizeSpace(u64),
    /// An extension after `;`, up to CR.
    Extension(u64),
    /// CR seen after the size line; LF must come.
    SizeLf(u64),
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// After the data: CR must come.
    DataCr,
    /// After the data's CR: LF must come.
    DataLf,
    /// After the last chunk's size line, or a trailer line: CR (the end) or a trailer.
    EndCr,
    /// Inside a trailer line.
    Trailer,
    /// A trailer line's CR seen: LF must come.
    TrailerLf,
    /// The end's CR seen: LF must come.
    EndLf,
}

/// A request head from its first byte.
const NEXT_HEAD: Stage = Stage::Head {
    blank: 0,
    searched: 0,
};

/// Where the screen is in a connection's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The first bytes: HTTP/2's preface, or a request head.
    Start,
    /// A request head: its first `blank` bytes are blank lines before the request line (skipped,
    /// as the parser skips them), and its first `searched` bytes were looked through for its end
    /// already. Both only grow while a head arrives, so a trickled head costs linear time.
    Head { blank: usize, searched: usize },
    /// A body framed by `Content-Length`: this many bytes left.
    Body(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// Not screened: HTTP/2, or a body the screen could not follow. hyper alone judges.
    Passthrough,
    /// A head was refused; nothing after it is read.
    Refused,
}

/// The screen's state machine over one connection's bytes: pure, so it is tested byte by byte.
#[derive(Debug)]
pub struct Framing {
    /// Where the stream is.
    stage: Stage,
    /// Request heads passed so far: the next head's position on the connection is this plus one.
    heads: u64,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            stage: Stage::Start,
            heads: 0,
        }
    }
}

impl Framing {
    /// Request heads passed so far (the stand-in of a refused head not counted).
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// True once the screen has stopped screening: everything passes untouched from here.
    pub fn is_passthrough(&self) -> bool {
        self.stage == Stage::Passthrough
    }

    /// Steps over `bytes` (the stream from where the framing stands) as far as they go: how
    /// many of them pass, and the refused head's position and why if one was refused right
    /// after them. Without a refusal, the rest is a head still arriving: give it again with more
    /// after it.
    pub fn screen(&mut self, bytes: &[u8]) -> (usize, Option<(u64, Refusal)>) {
        let mut passed = 0;
        while passed < bytes.len() {
            match self.step(&bytes[passed..]) {
                Step::Pass(0) | Step::Hold => break,
                Step::Pass(n) => passed += n,
                Step::Refuse(refusal) => return (passed, Some((self.heads + 1, refusal))),
            }
        }
        (passed, None)
    }

    /// Looks at `bytes` (the stream from where the previous step left off; after a `Hold`, the
    /// same bytes again with more after them) and says what to do with the front of them.
    pub fn step(&mut self, bytes: &[u8]) -> Step {
        if bytes.is_empty() {
            return Step::Pass(0);
        }
        match self.stage {
            Stage::Start => {
                let n = bytes.len().min(H2_PREFACE.len());
                if bytes[..n] != H2_PREFACE[..n] {
                    self.stage = NEXT_HEAD;
                    self.step(bytes)
                } else if n == H2_PREFACE.len() {
                    self.stage = Stage::Passthrough;
                    Step::Pass(bytes.len())
                } else {
                    Step::Hold
                }
            }
            Stage::Head { blank, searched } => self.head(bytes, blank, searched),
            Stage::Body(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                let left = left - n as u64;
                self.stage = if left == 0 {
                    NEXT_HEAD
                } else {
                    Stage::Body(left)
                };
                Step::Pass(n)
            }
            Stage::Chunked(chunk) => self.chunked(chunk, bytes),
            Stage::Passthrough => Step::Pass(bytes.len()),
            Stage::Refused => Step::Pass(0),
        }
    }

    /// A request head starting at `bytes[0]`.
    fn head(&mut self, bytes: &[u8], blank: usize, searched: usize) -> Step {
        let (end, blank) = head_end(bytes, blank, searched);
        let Some(end) = end else {
            if bytes.len() > MAX_HEAD_BYTES {
                return self.refuse(too_large(bytes));
            }
            // Resume a few bytes back: the end may straddle what arrived so far.
            self.stage = Stage::Head {
                blank,
                searched: bytes.len().saturating_sub(3),
            };
            return Step::Hold;
        };
        if end > MAX_HEAD_BYTES {
            return self.refuse(too_large(bytes));
        }
        let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        match request.parse_with_uninit_headers(&bytes[..end], &mut headers) {
            Ok(httparse::Status::Complete(len)) => {
                let framing = body_framing(request.version, request.headers);
                match framing {
                    Ok(stage) => {
                        self.heads += 1;
                        self.stage = stage;
                        Step::Pass(len)
                    }
                    Err(refusal) => self.refuse(refusal),
                }
            }
            // The parser wants more although a blank line ended the head: the screen and the
            // parser disagree, so stop screening rather than guess.
            Ok(httparse::Status::Partial) => {
                self.stage = Stage::Passthrough;
                Step::Pass(bytes.len())
            }
            Err(httparse::Error::TooManyHeaders) => self.refuse(Refusal::TooManyHeaders),
            Err(_) => self.refuse(Refusal::Malformed),
        }
    }

    fn refuse(&mut self, refusal: Refusal) -> Step {
        self.stage = Stage::Refused;
        Step::Refuse(refusal)
    }

    /// A chunked body, byte by byte as hyper's decoder reads it, the data in one step.
    fn chunked(&mut self, mut chunk: Chunk, bytes: &[u8]) -> Step {
        let mut at = 0;
        while at < bytes.len() {
            if let Chunk::Data(left) = chunk {
                let n = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - at);
                at += n;
                let left = left - n as u64;
                chunk = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                continue;
            }
            let byte = bytes[at];
            at += 1;
            let next = match (chunk, byte) {
                (Chunk::Start, _) => hex(byte).map(|d| Chunk::Size(u64::from(d))),
                (Chunk::Size(size), b'\t' | b' ') => Some(Chunk::SizeSpace(size)),
                (Chunk::Size(size) | Chunk::SizeSpace(size), b';') => Some(Chunk::Extension(size)),
                (Chunk::Size(size) | Chunk::SizeSpace(size) | Chunk::Extension(size), b'\r') => {
                    Some(Chunk::SizeLf(size))
                }
                (Chunk::Size(size), _) => hex(byte).and_then(|d| {
                    size.checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(d)))
                        .map(Chunk::Size)
                }),
                (Chunk::SizeSpace(size), b'\t' | b' ') => Some(Chunk::SizeSpace(size)),
                (Chunk::SizeSpace(_), _) => None,
                (Chunk::Extension(_), b'\n') => None,
                (Chunk::Extension(size), _) => Some(Chunk::Extension(size)),
                (Chunk::SizeLf(0), b'\n') => Some(Chunk::EndCr),
                (Chunk::SizeLf(size), b'\n') => Some(Chunk::Data(size)),
                (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
                (Chunk::DataLf, b'\n') => Some(Chunk::Start),
                (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
                (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
                (Chunk::EndCr | Chunk::Trailer, _) => Some(Chunk::Trailer),
                (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
                (Chunk::EndLf, b'\n') => {
                    self.stage = NEXT_HEAD;
                    return Step::Pass(at);
                }
                _ => None,
            };
            match next {
                Some(next) => chunk = next,
                // hyper fails the body here and the connection with it; stop screening.
                None => {
                    self.stage = Stage::Passthrough;
                    return Step::Pass(bytes.len());
                }
            }
        }
        self.stage = Stage::Chunked(chunk);
        Step::Pass(at)
    }
}

/// Why a head longer than [`MAX_HEAD_BYTES`] is refused: the first thing wrong with it, as the
/// parser would have found it (too many headers, say), else its size.
fn too_large(bytes: &[u8]) -> Refusal {
    let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(&bytes[..MAX_HEAD_BYTES], &mut headers) {
        Err(httparse::Error::TooManyHeaders) => Refusal::TooManyHeaders,
        Err(_) => Refusal::Malformed,
        Ok(_) => Refusal::HeadTooLarge,
    }
}

/// The value of a hex digit.
fn hex(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

/// The end of the head at the front of `bytes` (just past its blank line), looking from
/// `searched`, and how many bytes of blank lines come before its request line (counted on from
/// `blank`): those are skipped, as the parser skips them.
fn head_end(bytes: &[u8], mut blank: usize, searched: usize) -> (Option<usize>, usize) {
    while bytes.get(blank).is_some_and(|&b| b == b'\r' || b == b'\n') {
        blank += 1;
    }
    let mut from = searched.max(blank);
    while let Some(i) = memchr::memchr(b'\n', &bytes[from..]) {
        let lf = from + i;
        match (bytes.get(lf + 1), bytes.get(lf + 2)) {
            (Some(b'\n'), _) => return (Some(lf + 2), blank),
            (Some(b'\r'), Some(b'\n')) => return (Some(lf + 3), blank),
            (None, _) | (Some(b'\r'), None) => return (None, blank),
            _ => from = lf + 1,
        }
    }
    (None, blank)
}

/// How the body after a parsed head is framed, by hyper's rules, or why the head is refused.
fn body_framing(version: Option<u8>, headers: &[httparse::Header<'_>]) -> Result<Stage, Refusal> {
    let mut length: Option<u64> = None;
    let (mut has_length, mut bad_length) = (false, false);
    let (mut encoded, mut chunked) = (false, false);
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            has_length = true;
            match digits(header.value) {
                Some(n) if length.is_none_or(|prev| prev == n) => length = Some(n),
                _ => bad_length = true,
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            // Each line is judged by its last coding, and the last line decides, as hyper does.
            chunked = ends_in_chunked(header.value);
        }
    }
    if encoded {
        if has_length {
            return Err(Refusal::TwoFramings);
        }
        if version != Some(1) || !chunked {
            return Err(Refusal::BadTransferEncoding);
        }
        return Ok(Stage::Chunked(Chunk::Start));
    }
    match length {
        _ if bad_length => Err(Refusal::BadContentLength),
        // hyper's largest length (two values below the maximum mean "chunked" and "close").
        Some(n) if n >= u64::MAX - 1 => Err(Refusal::BadContentLength),
        Some(n) if n > 0 => Ok(Stage::Body(n)),
        _ => Ok(NEXT_HEAD),
    }
}

/// A decimal length: digits only, no sign, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked` (a value that is not visible
/// ASCII is not).
fn ends_in_chunked(value: &[u8]) -> bool {
    let visible = value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    visible
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The socket as hyper sees it: request heads screened (see the module doc).
pub struct HeadScreen<T> {
    /// The socket.
    inner: T,
    /// Where the stream is.
    framing: Framing,
    /// Bytes read from the socket and not yet handed to hyper: the first `ready` are cleared,
    /// the rest are a head still arriving.
    inbox: BytesMut,
    /// How many of `inbox`'s bytes hyper may have.
    ready: usize,
    /// The socket reached its end.
    eof: bool,
    /// Where a refusal goes for the service.
    refusals: RefusalSlot,
    /// After a refusal: until when the screen drains the socket at shutdown.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> HeadScreen<T> {
    /// Screens `inner`, leaving refusals in `refusals`.
    pub fn new(inner: T, refusals: RefusalSlot) -> Self {
        HeadScreen {
            inner,
            framing: Framing::default(),
            inbox: BytesMut::new(),
            ready: 0,
            eof: false,
            refusals,
            linger: None,
        }
    }

    /// Steps the framing over `bytes` (the stream from where it stands): how many of them pass.
    /// The rest is a head still arriving, or — when a refusal was recorded — dropped.
    fn screen(&mut self, bytes: &[u8]) -> (usize, bool) {
        let (passed, refused) = self.framing.screen(bytes);
        if let Some((position, refusal)) = refused {
            tracing::debug!(?refusal, position, "request head refused");
            let _ = self.refusals.set((position, refusal));
        }
        (passed, refused.is_some())
    }

    /// After a refusal: the first `keep` bytes of the inbox (requests before the refused head),
    /// then the stand-in, are all hyper gets from here.
    fn stand_in(&mut self, keep: usize) {
        self.inbox.truncate(keep);
        self.inbox.extend_from_slice(STAND_IN);
        self.ready = self.inbox.len();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadScreen<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.inbox[..n]);
                this.inbox.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.framing.stage == Stage::Refused {
                // hyper has the stand-in; it answers it and closes without reading again.
                return Poll::Pending;
            }
            if this.inbox.is_empty() {
                // Nothing held: read straight into hyper's buffer and screen it there. Only a
                // head cut by the read's end, or a refusal, moves bytes out again.
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                if this.framing.is_passthrough() || buf.filled().len() == before {
                    return Poll::Ready(Ok(()));
                }
                let (passed, refused) = this.screen(&buf.filled()[before..]);
                if refused {
                    this.stand_in(0);
                } else {
                    this.inbox
                        .extend_from_slice(&buf.filled()[before + passed..]);
                }
                buf.set_filled(before + passed);
                if passed > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // A head is arriving: read more behind it.
            if this.eof {
                // Cut short by the end: hyper sees what it would have seen unscreened.
                this.ready = this.inbox.len();
                continue;
            }
            this.inbox.reserve(READ_CHUNK);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.inbox
            ))?;
            if read == 0 {
                this.eof = true;
                continue;
            }
            let held = std::mem::take(&mut this.inbox);
            let (passed, refused) = this.screen(&held);
            this.inbox = held;
            if refused {
                this.stand_in(passed);
            } else {
                this.ready = passed;
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HeadScreen<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// After a refusal the answer is followed by a lingering close: the write side is shut, then
    /// what the client still sends is read and dropped until it closes or [`LINGER`] passes.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            if this.framing.stage != Stage::Refused || this.eof {
                return Poll::Ready(Ok(()));
            }
        }
        let linger = this
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        loop {
            if linger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            this.inbox.clear();
            this.inbox.reserve(READ_CHUNK);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.inbox
            )) {
                Ok(0) | Err(_) => {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` to a fresh framing in pieces of `piece` bytes, as a socket would, and
    /// returns what hyper is handed and the refusal if any.
    fn screen(stream: &[u8], piece: usize) -> (Vec<u8>, Option<(u64, Refusal)>, Framing) {
        let mut framing = Framing::default();
        let (mut held, mut handed) = (Vec::new(), Vec::new());
        for part in stream.chunks(piece.max(1)) {
            held.extend_from_slice(part);
            let (passed, refused) = framing.screen(&held);
            handed.extend_from_slice(&held[..passed]);
            if refused.is_some() {
                handed.extend_from_slice(STAND_IN);
                return (handed, refused, framing);
            }
            held.drain(..passed);
        }
        (handed, None, framing)
    }

    /// Every split of the stream gives the same outcome.
    fn screen_all_ways(stream: &[u8]) -> (Vec<u8>, Option<(u64, Refusal)>, Framing) {
        let whole = screen(stream, stream.len());
        for piece in [1, 2, 3, 7, 64] {
            let split = screen(stream, piece);
            assert_eq!(
                (&split.0, split.1),
                (&whole.0, whole.1),
                "in pieces of {piece}"
            );
            assert_eq!(split.2.heads, whole.2.heads);
        }
        whole
    }

    #[test]
    fn requests_pass_unchanged_with_their_bodies() {
        let stream = b"GET /v1/kv/a HTTP/1.1\r\nHost: localhost\r\n\r\n\
            PUT /v1/kv/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 24\r\n\r\nGET / HTTP/1.1\r\nX: y\r\n\r\n\
            PUT /v1/kv/b HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
            18;ext=1\r\nGET / HTTP/1.1\r\nX: 1\r\n\r\n\r\n0\r\nTrailer: t\r\n\r\n\
            \r\nGET /last HTTP/1.0\n\n";
        let (handed, refusal, framing) = screen_all_ways(stream);
        assert_eq!(refusal, None);
        assert_eq!(handed, stream, "the stream is handed over unchanged");
        // Requests inside bodies are not counted as heads.
        assert_eq!(framing.heads, 4);
        assert_eq!(framing.stage, NEXT_HEAD);
    }

    #[test]
    fn an_incomplete_head_is_held_back() {
        let (handed, refusal, framing) =
            screen_all_ways(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nHost: loc");
        assert_eq!(handed, b"GET /a HTTP/1.1\r\n\r\n");
        assert_eq!((refusal, framing.heads), (None, 1));
    }

    #[test]
    fn two_framings_are_refused_at_their_position() {
        for heads in [
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
            "Transfer-Encoding: chunked\r\ncontent-length: x\r\n",
        ] {
            let first = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
            let mut stream = first.clone();
            stream.extend_from_slice(
                format!(
                    "PUT /b HTTP/1.1\r\n{heads}\r\n5\r\nhello\r\n0\r\n\r\nGET /c HTTP/1.1\r\n\r\n"
                )
                .as_bytes(),
            );
            let (handed, refusal, _) = screen_all_ways(&stream);
            assert_eq!(refusal, Some((2, Refusal::TwoFramings)), "{heads}");
            assert_eq!(handed, [first, STAND_IN.to_vec()].concat(), "{heads}");
        }
    }

    #[test]
    fn what_hyper_refuses_is_refused_here() {
        let many: String = (0..=MAX_HEADERS)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect();
        let cases: Vec<(String, Refusal)> = vec![
            (
                format!("GET / HTTP/1.1\r\n{many}\r\n"),
                Refusal::TooManyHeaders,
            ),
            (
                format!(
                    "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
                    "a".repeat(MAX_HEAD_BYTES)
                ),
                Refusal::HeadTooLarge,
            ),
            // Past the size limit, the first thing wrong is named.
            (
                format!("GET / HTTP/1.1\r\n{}", "X: v\r\n".repeat(20_000)),
                Refusal::TooManyHeaders,
            ),
            // Too large although the end never comes.
            (
                format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES + 1)),
                Refusal::HeadTooLarge,
            ),
            (
                "GET / HTTP/1.1\r\nBad Name: v\r\n\r\n".into(),
                Refusal::Malformed,
            ),
            ("GET / HTTP/2.0\r\n\r\n".into(), Refusal::Malformed),
            (
                "\x16\x03\x01\x02\x00\x01\x00\x01\x03\x03\r\n\r\n".into(),
                Refusal::Malformed,
            ),
            (
                "PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".into(),
                Refusal::BadContentLength,
            ),
            (
                "PUT / HTTP/1.1\r\nContent-Length: +1\r\n\r\na".into(),
                Refusal::BadContentLength,
            ),
            (
                "PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n".into(),
                Refusal::BadContentLength,
            ),
            (
                "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".into(),
                Refusal::BadTransferEncoding,
            ),
            (
                "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n"
                    .into(),
                Refusal::BadTransferEncoding,
            ),
            (
                "PUT / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
                Refusal::BadTransferEncoding,
            ),
        ];
        for (stream, expected) in cases {
            let (handed, refusal, _) = screen_all_ways(stream.as_bytes());
            assert_eq!(
                refusal,
                Some((1, expected)),
                "{}",
                &stream[..stream.len().min(60)]
            );
            assert_eq!(handed, STAND_IN);
        }
        // Equal lengths repeated are one length, as hyper takes them.
        let (_, refusal, framing) =
            screen_all_ways(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab");
        assert_eq!((refusal, framing.stage), (None, NEXT_HEAD));
    }

    #[test]
    fn a_body_the_screen_cannot_follow_stops_screening() {
        // Chunk data not followed by CRLF: hyper fails this body and the connection.
        let stream = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (handed, refusal, framing) = screen_all_ways(stream);
        assert_eq!((handed.as_slice(), refusal), (&stream[..], None));
        assert!(framing.is_passthrough());
        for bad in [
            "zz\r\n",
            "1 2\r\n",
            "1;a\nb\r\n",
            "1\n",
            "11111111111111111\r\n",
        ] {
            let stream = format!("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{bad}");
            let (_, _, framing) = screen_all_ways(stream.as_bytes());
            assert!(framing.is_passthrough(), "{bad:?}");
        }
    }

    #[test]
    fn http2_is_not_screened() {
        let mut stream = H2_PREFACE.to_vec();
        stream.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00 anything");
        let (handed, refusal, framing) = screen_all_ways(&stream);
        assert_eq!((handed, refusal), (stream, None));
        assert!(framing.is_passthrough());
        // A head that merely starts like the preface is screened.
        let (_, refusal, _) = screen_all_ways(b"PRI * HTTP/1.1\r\nA: b\r\n\r\n");
        assert_eq!(refusal, None);
    }

    /// Mangled streams (bytes flipped, dropped, repeated in valid pipelines) never panic, and
    /// however they are split the screen hands over the same bytes and refuses the same head.
    #[test]
    fn mangled_streams_are_screened_the_same_however_split() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pipeline: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            PUT /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
            PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n\
            GET /d HTTP/1.0\r\n\r\n";
        for _ in 0..3_000 {
            let mut stream = pipeline.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..stream.len());
                match rng.random_range(0..3) {
                    0 => stream[at] = rng.random(),
                    1 => {
                        stream.remove(at);
                    }
                    _ => stream.insert(at, stream[at]),
                }
            }
            let (handed, refusal, _) = screen_all_ways(&stream);
            if refusal.is_none() {
                assert!(
                    stream.starts_with(&handed),
                    "nothing changed, only held back"
                );
            }
        }
    }

    /// A socket that yields `chunks` one read each, then its end.
    struct Script(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut chunk) = self.0.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.0.push_front(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// What hyper reads through the screen (in reads of `read_size`) until the end or until the
    /// screen stops handing out bytes, and whether it reached the end.
    fn read_through(stream: &[u8], piece: usize, read_size: usize) -> (Vec<u8>, bool, RefusalSlot) {
        use futures_util::FutureExt;
        use tokio::io::AsyncReadExt;
        let chunks = stream.chunks(piece).map(<[u8]>::to_vec).collect();
        let refusals = RefusalSlot::default();
        let mut screen = HeadScreen::new(Script(chunks), refusals.clone());
        let mut out = Vec::new();
        let mut buf = vec![0; read_size];
        loop {
            match screen.read(&mut buf).now_or_never() {
                Some(Ok(0)) => return (out, true, refusals),
                Some(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Some(Err(e)) => panic!("{e}"),
                None => return (out, false, refusals),
            }
        }
    }

    #[test]
    fn hyper_reads_screened_bytes_however_they_arrive() {
        let good =
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPUT /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
                .to_vec();
        let refused = b"PUT /c HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /d HTTP/1.1\r\n\r\n";
        let cut = b"GET /e HTTP/1.1\r\nHo";
        for piece in [1, 3, 7, 4096] {
            for read_size in [5, 8192] {
                let (out, ended, refusals) = read_through(&good, piece, read_size);
                assert_eq!((out.as_slice(), ended), (good.as_slice(), true));
                assert_eq!(refusals.get(), None);

                let stream = [good.as_slice(), refused].concat();
                let (out, ended, refusals) = read_through(&stream, piece, read_size);
                assert_eq!(
                    out,
                    [good.as_slice(), STAND_IN].concat(),
                    "{piece} {read_size}"
                );
                assert!(!ended, "nothing after the stand-in");
                assert_eq!(refusals.get(), Some(&(3, Refusal::TwoFramings)));

                // A head cut by the end is handed over as it is, then the end.
                let stream = [good.as_slice(), cut].concat();
                let (out, ended, _) = read_through(&stream, piece, read_size);
                assert_eq!((out, ended), (stream, true));
            }
        }
    }

    #[test]
    fn a_trickled_head_is_searched_once() {
        // Byte by byte, a long head (blank lines first, which the parser skips) costs a linear
        // search: the resume points only move forward.
        let mut framing = Framing::default();
        let head = format!(
            "{}GET / HTTP/1.1\r\nX: {}\r\n",
            "\r\n".repeat(5_000),
            "a".repeat(10_000)
        );
        let mut inbox = Vec::new();
        let mut last = (0, 0);
        for &b in head.as_bytes() {
            inbox.push(b);
            assert_eq!(framing.step(&inbox), Step::Hold);
            let Stage::Head { blank, searched } = framing.stage else {
                panic!("{:?}", framing.stage)
            };
            assert!(blank >= last.0 && searched >= last.1);
            assert!(blank.max(searched) + 3 >= inbox.len());
            last = (blank, searched);
        }
        assert_eq!(last.0, 10_000, "the blank lines before the request line");
        inbox.extend_from_slice(b"\r\n");
        assert_eq!(framing.step(&inbox), Step::Pass(inbox.len()));
    }
}
