//! `Content-Encoding` of request and response bodies: which codings the router reads, and one
//! streaming [`Decoder`] for gzip, deflate, br and zstd that both directions use.
//!
//! The decoder is pushed compressed chunks as Envoy hands them over and gives the decoded bytes to
//! a sink in pieces of at most [`OUT_CHUNK`] bytes; it never holds a decoded body. Its memory is
//! the codec's state and nothing that grows with the body:
//! - gzip / deflate: zlib-rs's inflater (a 32 KiB window; in wasm it runs in about a third of the
//!   instructions miniz_oxide needs); the gzip header and trailer are read here, so a header's file
//!   name or comment (unbounded) is skipped, never stored, as flate2's `GzDecoder` would store it. deflate is zlib (RFC 1950), or raw deflate (RFC
//!   1951) when the first two bytes are not a zlib header, as browsers tolerate.
//! - br: brotli-decompressor, refused when the stream's window is above [`MAX_WINDOW`].
//! - zstd: ruzstd, fed one block at a time (a block decodes to at most 128 KiB), refused when the
//!   frame's window is above [`MAX_WINDOW`] (RFC 9659 bounds HTTP's zstd windows to 8 MiB);
//!   skippable frames are skipped, dictionaries are not supported.
//!
//! A cap bounds the decoded total: past it the decoder stops at once with
//! [`DecodeError::TooLarge`], so a small bomb costs no more than the cap. Streams end where their
//! format says; data after the end (except another gzip member or zstd frame) is corrupt.

use zlib_rs::{Inflate, InflateFlush, Status};

/// Most decoded bytes handed to the sink at once.
pub const OUT_CHUNK: usize = 16 * 1024;

/// The largest brotli or zstd window decoded: 8 MiB (RFC 9659's limit for zstd in HTTP; brotli
/// libraries default to 4 MiB). Larger ones are refused, so one stream costs at most this.
pub const MAX_WINDOW: u64 = 8 << 20;

/// A coding the router decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Br,
    Zstd,
}

impl Coding {
    pub fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Br => "br",
            Coding::Zstd => "zstd",
        }
    }

    fn from_token(t: &[u8]) -> Option<Coding> {
        match t.to_ascii_lowercase().as_slice() {
            b"gzip" | b"x-gzip" => Some(Coding::Gzip),
            b"deflate" => Some(Coding::Deflate),
            b"br" => Some(Coding::Br),
            b"zstd" => Some(Coding::Zstd),
            _ => None,
        }
    }
}

/// What a message's `Content-Encoding` headers (one or several, read as one list) say, folded
/// header by header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// No header, or only `identity`.
    #[default]
    Identity,
    Coded(Coding),
    /// An unknown coding, or several stacked (`gzip, br`): the router can't read the body.
    Unsupported,
}

impl Encoding {
    /// Adds one `Content-Encoding` header value.
    pub fn with(self, value: &[u8]) -> Encoding {
        value.split(|b| *b == b',').map(<[u8]>::trim_ascii).fold(self, |acc, token| {
            if token.is_empty() || token.eq_ignore_ascii_case(b"identity") {
                return acc;
            }
            match (acc, Coding::from_token(token)) {
                (Encoding::Identity, Some(c)) => Encoding::Coded(c),
                _ => Encoding::Unsupported,
            }
        })
    }

    pub fn of<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Encoding {
        values.into_iter().fold(Encoding::Identity, Encoding::with)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload is not valid in its coding (or is cut short, at `finish`).
    Corrupt { coding: Coding, what: &'static str },
    /// The decoded bytes passed the cap.
    TooLarge,
    /// A brotli stream or zstd frame needs a window above [`MAX_WINDOW`].
    Window { coding: Coding, size: u64 },
}

impl DecodeError {
    /// The status a request gets for it: 400, 413 or 415.
    pub fn status(&self) -> u16 {
        match self {
            DecodeError::Corrupt { .. } => 400,
            DecodeError::TooLarge => 413,
            DecodeError::Window { .. } => 415,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Corrupt { .. } => "invalid_body",
            DecodeError::TooLarge => "request_too_large",
            DecodeError::Window { .. } => "unsupported_content_encoding",
        }
    }

    /// The rejection reason for the metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Corrupt { .. } => "bad_request",
            DecodeError::TooLarge => "too_large",
            DecodeError::Window { .. } => "unsupported_encoding",
        }
    }

    /// A message for a request body refused with it (`limit_mb`: `max_body_size_mb`).
    pub fn message(&self, limit_mb: u64) -> String {
        match self {
            DecodeError::Corrupt { coding, what } => format!("The request body could not be decoded as {}: {what}.", coding.name()),
            DecodeError::TooLarge => format!("The decoded request body is larger than the limit of {limit_mb} MB."),
            DecodeError::Window { coding, size } => format!(
                "The request body's {} window of {} KiB is larger than the {} KiB this router decodes; compress with a smaller window.",
                coding.name(),
                size >> 10,
                MAX_WINDOW >> 10
            ),
        }
    }
}

/// The message for a request whose `Content-Encoding` the router can't read (415).
pub const UNSUPPORTED_MESSAGE: &str = "The request's Content-Encoding is not supported: use one of gzip, deflate, br or zstd (or none).";

/// A streaming decoder; see the module doc. After an error every call returns that error.
pub struct Decoder {
    codec: Codec,
    produced: u64,
    cap: u64,
    failed: Option<DecodeError>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("coding", &self.coding()).field("produced", &self.produced).finish()
    }
}

enum Codec {
    Flate(Box<Flate>),
    Brotli(Box<Brotli>),
    Zstd(Box<Zstd>),
}

/// Why a codec stopped early.
enum Halt {
    /// The sink wants no more.
    Sink,
    Err(DecodeError),
}

type Out<'a> = dyn FnMut(&[u8]) -> Result<(), Halt> + 'a;

impl Decoder {
    /// A decoder for `coding` that refuses to decode more than `cap` bytes.
    pub fn new(coding: Coding, cap: u64) -> Decoder {
        let codec = match coding {
            Coding::Gzip => Codec::Flate(Box::new(Flate::new(true))),
            Coding::Deflate => Codec::Flate(Box::new(Flate::new(false))),
            Coding::Br => Codec::Brotli(Box::new(Brotli::new())),
            Coding::Zstd => Codec::Zstd(Box::new(Zstd::new())),
        };
        Decoder { codec, produced: 0, cap, failed: None }
    }

    pub fn coding(&self) -> Coding {
        match &self.codec {
            Codec::Flate(f) if f.gzip => Coding::Gzip,
            Codec::Flate(_) => Coding::Deflate,
            Codec::Brotli(_) => Coding::Br,
            Codec::Zstd(_) => Coding::Zstd,
        }
    }

    /// Decoded bytes so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Decodes the next compressed chunk, handing every decoded piece to `sink` in order; `sink`
    /// returns false to stop (the rest of the chunk is then not decoded).
    pub fn feed(&mut self, input: &[u8], mut sink: impl FnMut(&[u8]) -> bool) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let coding = self.coding();
        let (cap, produced) = (self.cap, &mut self.produced);
        let mut out = |piece: &[u8]| -> Result<(), Halt> {
            if piece.is_empty() {
                return Ok(());
            }
            let room = cap.saturating_sub(*produced);
            if piece.len() as u64 > room {
                *produced = cap;
                return Err(Halt::Err(DecodeError::TooLarge));
            }
            *produced += piece.len() as u64;
            if sink(piece) {
                Ok(())
            } else {
                Err(Halt::Sink)
            }
        };
        let codec = &mut self.codec;
        let result = SCRATCH.with(|scratch| {
            // Decoding never re-enters itself (the sink only reads), so one buffer serves every
            // stream of the VM; a re-entry would get a fresh one rather than fail.
            let mut fresh;
            let mut guard = scratch.try_borrow_mut();
            let buf: &mut [u8] = match guard.as_mut() {
                Ok(b) => &mut b[..],
                Err(_) => {
                    fresh = vec![0u8; OUT_CHUNK];
                    &mut fresh[..]
                }
            };
            match codec {
                Codec::Flate(f) => f.feed(input, buf, &mut out),
                Codec::Brotli(b) => b.feed(input, buf, &mut out),
                Codec::Zstd(z) => z.feed(input, buf, &mut out),
            }
        });
        match result {
            Ok(()) | Err(Halt::Sink) => Ok(()),
            Err(Halt::Err(e)) => {
                let e = match e {
                    DecodeError::Corrupt { what, .. } => DecodeError::Corrupt { coding, what },
                    e => e,
                };
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The input ended: Ok when the compressed stream was complete.
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let coding = self.coding();
        let complete = match &self.codec {
            Codec::Flate(f) => f.complete(),
            Codec::Brotli(b) => b.done,
            Codec::Zstd(z) => z.complete(),
        };
        if complete {
            Ok(())
        } else {
            let e = DecodeError::Corrupt { coding, what: "the compressed data ends early" };
            self.failed = Some(e.clone());
            Err(e)
        }
    }
}

thread_local! {
    /// The decoded pieces' buffer, shared by the VM's streams (wasm runs one callback at a time).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; OUT_CHUNK].into_boxed_slice());
}

/// Codecs report corruption with a placeholder coding; `Decoder::feed` names the real one.
fn corrupt(what: &'static str) -> Halt {
    Halt::Err(DecodeError::Corrupt { coding: Coding::Gzip, what })
}

/// Appends bytes from `input` to `pending` until it holds `need`; true when it does.
fn fill(pending: &mut Vec<u8>, input: &mut &[u8], need: usize) -> bool {
    let take = need.saturating_sub(pending.len()).min(input.len());
    let (head, rest) = input.split_at(take);
    pending.extend_from_slice(head);
    *input = rest;
    pending.len() >= need
}

// ---- gzip, zlib and raw deflate ----

const GZ_FTEXT_RESERVED: u8 = 0xe0;
const GZ_FHCRC: u8 = 0x02;
const GZ_FEXTRA: u8 = 0x04;
const GZ_FNAME: u8 = 0x08;
const GZ_FCOMMENT: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlateStage {
    /// gzip: the member header, in `pending` up to its fixed 10 bytes, then its optional parts.
    GzFixed,
    GzExtraLen,
    GzExtra {
        left: u16,
    },
    GzName,
    GzComment,
    GzHcrc,
    /// deflate: the first two bytes tell zlib from raw deflate.
    Sniff,
    Body,
    /// gzip: CRC-32 and size of the member (8 bytes).
    GzTrailer,
    /// The stream ended (deflate), or a gzip member did (another may follow).
    End,
}

struct Flate {
    gzip: bool,
    stage: FlateStage,
    flags: u8,
    pending: Vec<u8>,
    /// Created when the first member's data starts (its state is 42 KB, zeroed once).
    z: Option<Inflate>,
    /// gzip: CRC-32 of the header (for FHCRC), then of the member's data.
    crc: crc32fast::Hasher,
    size: u32,
    members: u32,
}

impl Flate {
    fn new(gzip: bool) -> Flate {
        Flate {
            gzip,
            stage: if gzip { FlateStage::GzFixed } else { FlateStage::Sniff },
            flags: 0,
            pending: Vec::new(),
            z: None,
            crc: crc32fast::Hasher::new(),
            size: 0,
            members: 0,
        }
    }

    fn complete(&self) -> bool {
        self.stage == FlateStage::End || (self.gzip && self.members > 0 && self.stage == FlateStage::GzFixed && self.pending.is_empty())
    }

    fn feed(&mut self, mut input: &[u8], out: &mut [u8], emit: &mut Out<'_>) -> Result<(), Halt> {
        while !input.is_empty() {
            match self.stage {
                FlateStage::GzFixed => {
                    if !fill(&mut self.pending, &mut input, 10) {
                        return Ok(());
                    }
                    let h = &self.pending;
                    if h[0] != 0x1f || h[1] != 0x8b {
                        return Err(corrupt(if self.members == 0 { "not a gzip header" } else { "data after the end of the gzip stream" }));
                    }
                    if h[2] != 8 || h[3] & GZ_FTEXT_RESERVED != 0 {
                        return Err(corrupt("unsupported gzip header"));
                    }
                    self.flags = h[3];
                    self.crc = crc32fast::Hasher::new();
                    self.crc.update(h);
                    self.pending.clear();
                    self.stage = FlateStage::GzExtraLen;
                    self.after_header_part();
                }
                FlateStage::GzExtraLen => {
                    if !fill(&mut self.pending, &mut input, 2) {
                        return Ok(());
                    }
                    self.crc.update(&self.pending);
                    let left = u16::from_le_bytes([self.pending[0], self.pending[1]]);
                    self.pending.clear();
                    self.stage = FlateStage::GzExtra { left };
                    if left == 0 {
                        self.stage = FlateStage::GzName;
                        self.after_header_part();
                    }
                }
                FlateStage::GzExtra { left } => {
                    let n = (left as usize).min(input.len());
                    self.crc.update(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u16;
                    self.stage = FlateStage::GzExtra { left };
                    if left == 0 {
                        self.stage = FlateStage::GzName;
                        self.after_header_part();
                    }
                }
                FlateStage::GzName | FlateStage::GzComment => {
                    // Skipped up to its NUL, never kept.
                    let end = memchr::memchr(0, input);
                    let n = end.map_or(input.len(), |i| i + 1);
                    self.crc.update(&input[..n]);
                    input = &input[n..];
                    if end.is_some() {
                        self.stage = if self.stage == FlateStage::GzName { FlateStage::GzComment } else { FlateStage::GzHcrc };
                        self.after_header_part();
                    }
                }
                FlateStage::GzHcrc => {
                    if !fill(&mut self.pending, &mut input, 2) {
                        return Ok(());
                    }
                    let want = u16::from_le_bytes([self.pending[0], self.pending[1]]);
                    let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
                    if want != crc as u16 {
                        return Err(corrupt("gzip header checksum mismatch"));
                    }
                    self.pending.clear();
                    self.start_body(false);
                }
                FlateStage::Sniff => {
                    if !fill(&mut self.pending, &mut input, 2) {
                        return Ok(());
                    }
                    let (cmf, flg) = (self.pending[0], self.pending[1]);
                    let zlib = cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0;
                    self.start_body(zlib);
                    let head = std::mem::take(&mut self.pending);
                    if !self.inflate(&head, out, emit)?.is_empty() {
                        return Err(corrupt("data after the end of the compressed stream"));
                    }
                }
                FlateStage::Body => input = self.inflate(input, out, emit)?,
                FlateStage::GzTrailer => {
                    if !fill(&mut self.pending, &mut input, 8) {
                        return Ok(());
                    }
                    let t = &self.pending;
                    let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
                    let size = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
                    let sum = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
                    if crc != sum || size != self.size {
                        return Err(corrupt("gzip checksum mismatch"));
                    }
                    self.pending.clear();
                    self.members += 1;
                    // Another member may follow (RFC 1952 §2.2).
                    self.stage = FlateStage::GzFixed;
                }
                FlateStage::End => return Err(corrupt("data after the end of the compressed stream")),
            }
        }
        Ok(())
    }

    /// Moves past optional gzip header parts whose flag is not set.
    fn after_header_part(&mut self) {
        loop {
            let (flag, next) = match self.stage {
                FlateStage::GzExtraLen => (GZ_FEXTRA, FlateStage::GzName),
                FlateStage::GzName => (GZ_FNAME, FlateStage::GzComment),
                FlateStage::GzComment => (GZ_FCOMMENT, FlateStage::GzHcrc),
                FlateStage::GzHcrc => {
                    if self.flags & GZ_FHCRC == 0 {
                        self.start_body(false);
                    }
                    return;
                }
                _ => return,
            };
            if self.flags & flag != 0 {
                return;
            }
            self.stage = next;
        }
    }

    fn start_body(&mut self, zlib: bool) {
        match self.z.as_mut() {
            Some(z) => z.reset(zlib),
            None => self.z = Some(Inflate::new(zlib, 15)),
        }
        self.crc = crc32fast::Hasher::new();
        self.size = 0;
        self.stage = FlateStage::Body;
    }

    /// Inflates from `input` until it is used up or the stream ends; returns the unused rest.
    fn inflate<'i>(&mut self, mut input: &'i [u8], out: &mut [u8], emit: &mut Out<'_>) -> Result<&'i [u8], Halt> {
        let Some(z) = self.z.as_mut() else { return Err(corrupt("no deflate stream")) };
        loop {
            let (in0, out0) = (z.total_in(), z.total_out());
            let status = z.decompress(input, out, InflateFlush::NoFlush).map_err(|_| corrupt("invalid deflate data"))?;
            let used = (z.total_in() - in0) as usize;
            let made = (z.total_out() - out0) as usize;
            input = input.get(used..).unwrap_or_default();
            let piece = out.get(..made).unwrap_or_default();
            if self.gzip {
                self.crc.update(piece);
                self.size = self.size.wrapping_add(made as u32);
            }
            emit(piece)?;
            if status == Status::StreamEnd {
                self.stage = if self.gzip { FlateStage::GzTrailer } else { FlateStage::End };
                return Ok(input);
            }
            if used == 0 && made == 0 {
                // Needs more input (or the output space, which it always has here).
                return Ok(input);
            }
        }
    }
}

// ---- brotli ----

type BrotliState = brotli_decompressor::BrotliState<
    brotli_decompressor::StandardAlloc,
    brotli_decompressor::StandardAlloc,
    brotli_decompressor::StandardAlloc,
>;

struct Brotli {
    state: BrotliState,
    checked: bool,
    done: bool,
}

/// The window a brotli stream declares in its first byte (RFC 7932 §9.1); None for the
/// large-window extension (not RFC 7932), or the reserved pattern.
fn brotli_window(first: u8) -> Option<u64> {
    let bits = if first & 1 == 0 {
        16
    } else if (first >> 1) & 7 != 0 {
        17 + u32::from((first >> 1) & 7)
    } else {
        match (first >> 4) & 7 {
            0 => 17,
            1 => return None,
            m => 8 + u32::from(m),
        }
    };
    Some((1u64 << bits) - 16)
}

impl Brotli {
    fn new() -> Brotli {
        use brotli_decompressor::StandardAlloc;
        Brotli {
            state: BrotliState::new(StandardAlloc::default(), StandardAlloc::default(), StandardAlloc::default()),
            checked: false,
            done: false,
        }
    }

    fn feed(&mut self, mut input: &[u8], out: &mut [u8], emit: &mut Out<'_>) -> Result<(), Halt> {
        use brotli_decompressor::BrotliResult;
        if input.is_empty() {
            return Ok(());
        }
        if self.done {
            return Err(corrupt("data after the end of the compressed stream"));
        }
        if !self.checked {
            match input.first().copied().map(brotli_window) {
                Some(Some(size)) if size <= MAX_WINDOW => self.checked = true,
                Some(Some(size)) => return Err(Halt::Err(DecodeError::Window { coding: Coding::Br, size })),
                _ => return Err(Halt::Err(DecodeError::Window { coding: Coding::Br, size: u64::MAX })),
            }
        }
        loop {
            let (mut avail_in, mut in_off, mut avail_out, mut out_off, mut total) = (input.len(), 0, out.len(), 0, 0);
            let r = brotli_decompressor::BrotliDecompressStream(
                &mut avail_in,
                &mut in_off,
                input,
                &mut avail_out,
                &mut out_off,
                out,
                &mut total,
                &mut self.state,
            );
            input = input.get(in_off..).unwrap_or_default();
            emit(out.get(..out_off).unwrap_or_default())?;
            match r {
                BrotliResult::ResultSuccess => {
                    self.done = true;
                    if !input.is_empty() {
                        return Err(corrupt("data after the end of the compressed stream"));
                    }
                    return Ok(());
                }
                BrotliResult::NeedsMoreInput => return Ok(()),
                BrotliResult::NeedsMoreOutput => {}
                BrotliResult::ResultFailure => return Err(corrupt("invalid brotli data")),
            }
        }
    }
}

// ---- zstd ----

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const ZSTD_SKIPPABLE: u32 = 0x184D_2A50;
/// The largest block's content (RFC 8878 §3.1.1.2.4).
const ZSTD_BLOCK_MAX: usize = 128 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZstdStage {
    /// Before a frame: magic number and header, gathered in `pending`.
    Frame,
    /// Skipping a skippable frame's bytes.
    Skip { left: u64 },
    /// The next block (header, content, and after the last one the checksum).
    Block,
}

struct Zstd {
    frame: ruzstd::decoding::FrameDecoder,
    stage: ZstdStage,
    pending: Vec<u8>,
    checksum: bool,
    frames: u32,
}

/// The length of a zstd frame header (magic number included) with this frame header descriptor.
fn zstd_header_len(descriptor: u8) -> usize {
    let single = descriptor & 0x20 != 0;
    let dict = [0, 1, 2, 4][(descriptor & 3) as usize];
    let fcs = match descriptor >> 6 {
        0 => usize::from(single),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    5 + usize::from(!single) + dict + fcs
}

/// The window a whole zstd frame header `h` declares (RFC 8878 §3.1.1.1.2).
fn zstd_window(h: &[u8]) -> u64 {
    let descriptor = h.get(4).copied().unwrap_or(0);
    if descriptor & 0x20 == 0 {
        let wd = h.get(5).copied().unwrap_or(0);
        let base = 1u64 << (10 + u32::from(wd >> 3));
        return base + (base / 8) * u64::from(wd & 7);
    }
    // Single segment: the window is the content size.
    let dict = [0, 1, 2, 4][(descriptor & 3) as usize];
    let fcs = h.get(5 + dict..).unwrap_or_default();
    let mut le = [0u8; 8];
    let n = fcs.len().min(8);
    le[..n].copy_from_slice(&fcs[..n]);
    let v = u64::from_le_bytes(le);
    if descriptor >> 6 == 1 {
        v + 256
    } else {
        v
    }
}

impl Zstd {
    fn new() -> Zstd {
        Zstd { frame: ruzstd::decoding::FrameDecoder::new(), stage: ZstdStage::Frame, pending: Vec::new(), checksum: false, frames: 0 }
    }

    fn complete(&self) -> bool {
        self.frames > 0 && self.stage == ZstdStage::Frame && self.pending.is_empty()
    }

    fn feed(&mut self, mut input: &[u8], out: &mut [u8], emit: &mut Out<'_>) -> Result<(), Halt> {
        while !input.is_empty() {
            match self.stage {
                ZstdStage::Frame => {
                    if !fill(&mut self.pending, &mut input, 4) {
                        return Ok(());
                    }
                    let magic = u32::from_le_bytes([self.pending[0], self.pending[1], self.pending[2], self.pending[3]]);
                    if magic & 0xFFFF_FFF0 == ZSTD_SKIPPABLE {
                        if !fill(&mut self.pending, &mut input, 8) {
                            return Ok(());
                        }
                        let left = u32::from_le_bytes([self.pending[4], self.pending[5], self.pending[6], self.pending[7]]);
                        self.pending.clear();
                        self.stage = ZstdStage::Skip { left: u64::from(left) };
                        if left == 0 {
                            self.stage = ZstdStage::Frame;
                            self.frames += 1;
                        }
                        continue;
                    }
                    if magic != ZSTD_MAGIC {
                        return Err(corrupt(if self.frames == 0 { "not a zstd frame" } else { "data after the end of the zstd stream" }));
                    }
                    if !fill(&mut self.pending, &mut input, 5) {
                        return Ok(());
                    }
                    let descriptor = self.pending[4];
                    if descriptor & 0x08 != 0 {
                        return Err(corrupt("invalid zstd frame header"));
                    }
                    if !fill(&mut self.pending, &mut input, zstd_header_len(descriptor)) {
                        return Ok(());
                    }
                    let size = zstd_window(&self.pending);
                    if size > MAX_WINDOW {
                        return Err(Halt::Err(DecodeError::Window { coding: Coding::Zstd, size }));
                    }
                    self.frame
                        .reset(&self.pending[..])
                        .map_err(|_| corrupt("invalid zstd frame header (dictionaries are not supported)"))?;
                    self.checksum = descriptor & 0x04 != 0;
                    self.pending.clear();
                    self.stage = ZstdStage::Block;
                }
                ZstdStage::Skip { left } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    input = &input[n..];
                    let left = left - n as u64;
                    self.stage = if left == 0 { ZstdStage::Frame } else { ZstdStage::Skip { left } };
                    if left == 0 {
                        self.frames += 1;
                    }
                }
                ZstdStage::Block => {
                    // The block's header tells how much of it to gather; a whole block from the
                    // chunk at hand is decoded in place.
                    let from_input = self.pending.is_empty() && input.len() >= 3;
                    let head = if from_input {
                        [input[0], input[1], input[2]]
                    } else {
                        if !fill(&mut self.pending, &mut input, 3) {
                            return Ok(());
                        }
                        [self.pending[0], self.pending[1], self.pending[2]]
                    };
                    let h = u32::from_le_bytes([head[0], head[1], head[2], 0]);
                    let (last, kind, size) = (h & 1 == 1, (h >> 1) & 3, (h >> 3) as usize);
                    if kind == 3 || size > ZSTD_BLOCK_MAX {
                        return Err(corrupt("invalid zstd block"));
                    }
                    let content = if kind == 1 { 1 } else { size };
                    let unit = 3 + content + if last && self.checksum { 4 } else { 0 };
                    let block: &[u8] = if from_input && input.len() >= unit {
                        let (b, rest) = input.split_at(unit);
                        input = rest;
                        b
                    } else {
                        if !fill(&mut self.pending, &mut input, unit) {
                            return Ok(());
                        }
                        &self.pending
                    };
                    self.frame
                        .decode_blocks(block, ruzstd::decoding::BlockDecodingStrategy::UptoBlocks(1))
                        .map_err(|_| corrupt("invalid zstd data"))?;
                    loop {
                        let n = std::io::Read::read(&mut self.frame, out).map_err(|_| corrupt("invalid zstd data"))?;
                        if n == 0 {
                            break;
                        }
                        emit(out.get(..n).unwrap_or_default())?;
                    }
                    self.pending.clear();
                    if last {
                        if self.checksum && self.frame.get_checksum_from_data() != self.frame.get_calculated_checksum() {
                            return Err(corrupt("zstd checksum mismatch"));
                        }
                        self.frames += 1;
                        self.stage = ZstdStage::Frame;
                    }
                }
            }
        }
        Ok(())
    }
}
