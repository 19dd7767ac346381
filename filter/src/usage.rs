//! Token usage the provider reports, read from the response body as it streams to the client:
//! every chunk is looked at once and passed on, nothing is held back, and a stream costs at most
//! [`MAX_USAGE_LEN`] bytes of buffer (allocated only once a `usage` object starts) plus a few
//! words of state, whatever the body's size, nesting or bytes.
//!
//! - [`Format::Json`] (a non-streaming answer): the top-level object's `usage` object. Chat,
//!   Completions and Embeddings report `prompt_tokens` / `completion_tokens` / `total_tokens`
//!   (embeddings have no completion), the Responses API `input_tokens` / `output_tokens` /
//!   `total_tokens`. OpenAI puts `usage` last, other providers first: the body is scanned, not
//!   parsed, for a top-level `usage` key; only that value is kept and parsed with serde_json. A
//!   `usage` anywhere else (inside `choices`, say) is data. It counts as soon as its value ends,
//!   also when the rest of the body is cut off or invalid (the tokens were spent).
//! - [`Format::Sse`] (`text/event-stream`): each `data:` line is scanned the same way as it
//!   passes (never stored, so a line of any length costs nothing), for a top-level `usage` (chat
//!   and completions with `stream_options.include_usage` send `{"choices":[],"usage":{..}}` before
//!   `[DONE]`) or a `usage` inside the top-level `response` (the Responses API's
//!   `response.completed`, `.incomplete` and `.failed` events). An event counts when its line ends
//!   with its top-level object closed; the last one wins (some providers report running totals in
//!   every chunk). `[DONE]`, comments, `event:`/`id:`/`retry:` and blank lines are skipped. Lines
//!   end with LF or CRLF (a lone CR, legal in SSE but sent by nobody, is not a line end), and a
//!   `data:` line is one event (no provider splits its JSON over several `data:` lines).
//!
//! In both, "the last readable `usage` wins": a `usage` that is `null` (every chunk but the last
//! of an OpenAI stream), not an object, longer than [`MAX_USAGE_LEN`] or without any count does
//! not replace an earlier one. A count is a non-negative integer (in u64); a float, a negative, a
//! string or an overflowing number is as if the field were absent (0). `total` is `total_tokens`
//! when reported, else prompt + completion.
//!
//! A compressed answer (`Content-Encoding` gzip, deflate, br, zstd: [`UsageReader::decoding`]) is
//! scanned as it decodes, in [`crate::content_encoding::OUT_CHUNK`] pieces, never held whole; one
//! that does not decode reports no usage.
//!
//! The scan does not validate JSON (the client judges the body, we only count): on valid JSON it
//! finds the `usage` that `serde_json::Value` holds, within the rules above (`tests/usage.rs`
//! checks that differentially); on anything
//! else it never panics and stays within its bounds. Keys are compared decoded (`"us\u0061ge"` is
//! `usage`). Strings, where most of a body's bytes are, are skipped with `memchr`.

use crate::content_encoding::{Coding, DecodeError, Decoder};
use memchr::{memchr, memchr2};
use serde::Deserialize;
use serde_json::Value;

/// Most bytes of one `usage` value kept for parsing; a longer one is skipped (not readable).
/// OpenAI's, with its `*_details`, is about 300 bytes.
pub const MAX_USAGE_LEN: usize = 4096;

/// Tokens one response reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

/// How the response body is framed, from its content-type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: one JSON document.
    Json,
    /// `text/event-stream`: server-sent events with JSON `data:`.
    Sse,
}

impl Format {
    /// `text/event-stream` → Sse, `application/json` → Json (case-insensitive, parameters such as
    /// `; charset=utf-8` ignored); anything else has no usage we read.
    pub fn from_content_type(content_type: &str) -> Option<Format> {
        let mime = content_type.split(';').next().unwrap_or_default().trim();
        if mime.eq_ignore_ascii_case("text/event-stream") {
            Some(Format::Sse)
        } else if mime.eq_ignore_ascii_case("application/json") {
            Some(Format::Json)
        } else {
            None
        }
    }
}

/// The fields we read; serde skips the rest (`*_details`) without building them.
#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<Value>,
    #[serde(default)]
    completion_tokens: Option<Value>,
    #[serde(default)]
    input_tokens: Option<Value>,
    #[serde(default)]
    output_tokens: Option<Value>,
    #[serde(default)]
    total_tokens: Option<Value>,
}

impl Usage {
    /// Reads one `usage` object's JSON text. None when it is not a JSON object (with no duplicate
    /// field) or holds no count at all.
    pub fn parse(json: &[u8]) -> Option<Usage> {
        // serde's derive would also take an array of the fields in order.
        if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        let raw: RawUsage = serde_json::from_slice(json).ok()?;
        let count = |v: &Option<Value>| v.as_ref().and_then(Value::as_u64);
        let prompt = count(&raw.prompt_tokens).or(count(&raw.input_tokens));
        let completion = count(&raw.completion_tokens).or(count(&raw.output_tokens));
        let total = count(&raw.total_tokens);
        if prompt.is_none() && completion.is_none() && total.is_none() {
            return None;
        }
        let (prompt, completion) = (prompt.unwrap_or(0), completion.unwrap_or(0));
        Some(Usage { prompt, completion, total: total.unwrap_or(prompt.saturating_add(completion)) })
    }
}

/// Most decoded bytes of one compressed answer read for usage (an answer this large reports its
/// usage, if at all, past what is worth a worker's time: decoding stops there).
pub const MAX_DECODED_ANSWER: u64 = 256 << 20;

/// Incremental reader of one response body; see the module doc. Feed every chunk in order.
#[derive(Debug)]
pub struct UsageReader {
    inner: Inner,
    /// A compressed answer's decoder: the scan reads what it decodes.
    decoder: Option<Box<Decoder>>,
    /// The compressed answer could not be read (corrupt, or a window too large): no usage.
    unreadable: bool,
}

#[derive(Debug)]
enum Inner {
    Json(JsonScan),
    Sse(SseScan),
}

impl UsageReader {
    pub fn new(format: Format) -> UsageReader {
        let inner = match format {
            Format::Json => Inner::Json(JsonScan::new(false)),
            Format::Sse => Inner::Sse(SseScan { line: Line::Field(0), json: JsonScan::new(true), last: None }),
        };
        UsageReader { inner, decoder: None, unreadable: false }
    }

    /// A reader of an answer with this `Content-Encoding` (None: not compressed). It is fed the
    /// compressed chunks and scans the decoded bytes, at most [`MAX_DECODED_ANSWER`] of them.
    pub fn decoding(format: Format, coding: Option<Coding>) -> UsageReader {
        let mut r = UsageReader::new(format);
        r.decoder = coding.map(|c| Box::new(Decoder::new(c, MAX_DECODED_ANSWER)));
        r
    }

    /// The next chunk of the body. Never fails; work is linear in the chunk (in what it decodes
    /// to, for a compressed answer).
    pub fn feed(&mut self, chunk: &[u8]) {
        let Some(d) = self.decoder.as_mut() else { return self.inner.feed(chunk) };
        if self.unreadable {
            return;
        }
        let inner = &mut self.inner;
        match d.feed(chunk, |piece| {
            inner.feed(piece);
            true
        }) {
            // Past the cap: what was read still counts, the rest is not decoded.
            Ok(()) | Err(DecodeError::TooLarge) => {}
            Err(_) => self.unreadable = true,
        }
    }

    /// What is known so far (for SSE: events whose line has ended).
    pub fn usage(&self) -> Option<Usage> {
        if self.unreadable {
            return None;
        }
        match &self.inner {
            Inner::Json(j) => j.found,
            Inner::Sse(s) => s.last,
        }
    }

    /// The end of the body (an SSE stream's last line may lack its newline).
    pub fn finish(self) -> Option<Usage> {
        if self.unreadable {
            return None;
        }
        match self.inner {
            Inner::Json(j) => j.found,
            Inner::Sse(mut s) => {
                if s.line == Line::Data {
                    s.end_data_line();
                }
                s.last
            }
        }
    }

    /// Heap bytes held: 0, or [`MAX_USAGE_LEN`] once a `usage` object was seen.
    pub fn buffered_bytes(&self) -> usize {
        match &self.inner {
            Inner::Json(j) => j.buf.capacity(),
            Inner::Sse(s) => s.json.buf.capacity(),
        }
    }
}

impl Inner {
    fn feed(&mut self, chunk: &[u8]) {
        match self {
            Inner::Json(j) => j.feed(chunk),
            Inner::Sse(s) => s.feed(chunk),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// At the start of a line: this many bytes of `data:` matched.
    Field(u8),
    /// In a `data:` value: its bytes go to the JSON scan.
    Data,
    /// Any other line: skipped to its end.
    Skip,
}

const DATA: &[u8] = b"data:";

#[derive(Debug)]
struct SseScan {
    line: Line,
    json: JsonScan,
    last: Option<Usage>,
}

impl SseScan {
    fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            let rest = &chunk[i..];
            match self.line {
                Line::Field(matched) => {
                    let b = rest[0];
                    if b == b'\n' {
                        self.line = Line::Field(0);
                        i += 1;
                    } else if let Some(&want) = DATA.get(usize::from(matched)) {
                        self.line = if b == want { Line::Field(matched + 1) } else { Line::Skip };
                        i += 1;
                    } else {
                        // `data:` matched: one optional space, then the value.
                        if b == b' ' {
                            i += 1;
                        }
                        self.line = Line::Data;
                    }
                }
                Line::Data => match memchr(b'\n', rest) {
                    Some(k) => {
                        self.json.feed(&rest[..k]);
                        self.end_data_line();
                        i += k + 1;
                    }
                    None => {
                        self.json.feed(rest);
                        i = chunk.len();
                    }
                },
                Line::Skip => match memchr(b'\n', rest) {
                    Some(k) => {
                        self.line = Line::Field(0);
                        i += k + 1;
                    }
                    None => i = chunk.len(),
                },
            }
        }
    }

    fn end_data_line(&mut self) {
        if self.json.state == St::Done {
            if let Some(u) = self.json.found {
                self.last = Some(u);
            }
        }
        self.json.reset();
        self.line = Line::Field(0);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Usage,
    Response,
}

impl Target {
    fn name(self) -> &'static [u8] {
        match self {
            Target::Usage => b"usage",
            Target::Response => b"response",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Before the document: whitespace, then `{` (anything else: Dead).
    Start,
    /// Between tokens.
    Main,
    /// In a string we skip.
    Str,
    /// After a backslash in a skipped string.
    StrEsc,
    /// In a key of a watched object, still matching a target name.
    Key,
    KeyEsc,
    /// `left` hex digits of a `\u` escape in a key to go.
    KeyHex {
        left: u8,
        acc: u32,
    },
    /// The top-level object closed; the rest is ignored.
    Done,
    /// Not an object: nothing to read.
    Dead,
}

/// The non-validating scan of one JSON document for its `usage` (and, for SSE, `response.usage`).
#[derive(Debug)]
struct JsonScan {
    /// Also look in the top-level `response` object (SSE, the Responses API).
    watch_response: bool,
    state: St,
    depth: u32,
    /// The next string at this depth is a key of a watched object.
    at_key: bool,
    /// The current key may be `response` (top level, SSE).
    key_response: bool,
    key_target: Option<Target>,
    key_pos: u8,
    /// The last key was a target; `colon` once its `:` passed.
    pending: Option<Target>,
    colon: bool,
    /// Inside the top-level `response` object (depth 2).
    in_response: bool,
    /// Depth of the `usage` object being copied into `buf`.
    capture: Option<u32>,
    overflow: bool,
    buf: Vec<u8>,
    /// The last readable usage of this document.
    found: Option<Usage>,
}

fn hex(b: u8) -> Option<u32> {
    char::from(b).to_digit(16)
}

impl JsonScan {
    fn new(watch_response: bool) -> JsonScan {
        JsonScan {
            watch_response,
            state: St::Start,
            depth: 0,
            at_key: false,
            key_response: false,
            key_target: None,
            key_pos: 0,
            pending: None,
            colon: false,
            in_response: false,
            capture: None,
            overflow: false,
            buf: Vec::new(),
            found: None,
        }
    }

    /// For the next SSE line; the buffer's allocation is kept.
    fn reset(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        *self = JsonScan { buf, ..JsonScan::new(self.watch_response) };
    }

    fn watched(&self) -> bool {
        self.depth == 1 || (self.depth == 2 && self.in_response)
    }

    /// One decoded character of a key: false once it can't be a target name.
    fn key_char(&mut self, c: u32) -> bool {
        if self.key_pos == 0 {
            self.key_target = match c {
                0x75 => Some(Target::Usage),
                0x72 if self.key_response => Some(Target::Response),
                _ => None,
            };
        }
        let Some(t) = self.key_target else { return false };
        match t.name().get(usize::from(self.key_pos)) {
            Some(&b) if u32::from(b) == c => {
                self.key_pos += 1;
                true
            }
            _ => false,
        }
    }

    fn end_key(&mut self) {
        self.pending = self.key_target.filter(|t| usize::from(self.key_pos) == t.name().len());
        self.colon = false;
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + bytes.len() > MAX_USAGE_LEN {
            self.overflow = true;
            self.buf.clear();
            return;
        }
        if self.buf.capacity() == 0 {
            // Exactly the bound, once: `extend` alone may grow past it.
            self.buf.reserve_exact(MAX_USAGE_LEN);
        }
        self.buf.extend_from_slice(bytes);
    }

    fn feed(&mut self, chunk: &[u8]) {
        let n = chunk.len();
        let mut i = 0;
        // Where the part of `usage` in this chunk starts (0 when it began in an earlier one).
        let mut cap_from = 0;
        while i < n {
            match self.state {
                St::Done | St::Dead => break,
                St::Str => match memchr2(b'"', b'\\', &chunk[i..]) {
                    None => i = n,
                    Some(k) => {
                        let j = i + k;
                        self.state = if chunk[j] == b'"' { St::Main } else { St::StrEsc };
                        i = j + 1;
                    }
                },
                St::StrEsc => {
                    self.state = St::Str;
                    i += 1;
                }
                St::Start => {
                    let b = chunk[i];
                    i += 1;
                    if b == b'{' {
                        self.depth = 1;
                        self.at_key = true;
                        self.state = St::Main;
                    } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                        self.state = St::Dead;
                    }
                }
                St::Key => {
                    let b = chunk[i];
                    i += 1;
                    match b {
                        b'"' => {
                            self.end_key();
                            self.state = St::Main;
                        }
                        b'\\' => self.state = St::KeyEsc,
                        _ if self.key_char(u32::from(b)) => {}
                        _ => self.state = St::Str,
                    }
                }
                St::KeyEsc => {
                    // Only `\u` can spell a letter; any other escape ends the match.
                    self.state = if chunk[i] == b'u' { St::KeyHex { left: 4, acc: 0 } } else { St::Str };
                    i += 1;
                }
                St::KeyHex { left, acc } => match hex(chunk[i]) {
                    // Not a hex digit (invalid JSON): left to the skipped string, which may end here.
                    None => self.state = St::Str,
                    Some(d) => {
                        let acc = acc << 4 | d;
                        self.state = if left > 1 {
                            St::KeyHex { left: left - 1, acc }
                        } else if self.key_char(acc) {
                            St::Key
                        } else {
                            St::Str
                        };
                        i += 1;
                    }
                },
                St::Main => {
                    match chunk[i] {
                        b' ' | b'\t' | b'\n' | b'\r' => {}
                        b'"' => {
                            if self.at_key {
                                self.at_key = false;
                                self.key_response = self.watch_response && self.depth == 1;
                                self.key_target = None;
                                self.key_pos = 0;
                                self.state = St::Key;
                            } else {
                                self.pending = None;
                                self.state = St::Str;
                            }
                        }
                        b':' => self.colon = self.pending.is_some(),
                        b'{' => {
                            self.depth = self.depth.saturating_add(1);
                            if self.colon {
                                match self.pending {
                                    Some(Target::Usage) => {
                                        self.capture = Some(self.depth);
                                        self.overflow = false;
                                        self.buf.clear();
                                        cap_from = i;
                                    }
                                    Some(Target::Response) => self.in_response = true,
                                    None => {}
                                }
                            }
                            self.pending = None;
                            self.colon = false;
                            self.at_key = self.watched();
                        }
                        b'}' | b']' => {
                            if self.capture == Some(self.depth) {
                                self.capture = None;
                                self.append(&chunk[cap_from..=i]);
                                if !self.overflow {
                                    if let Some(u) = Usage::parse(&self.buf) {
                                        self.found = Some(u);
                                    }
                                }
                            }
                            self.depth = self.depth.saturating_sub(1);
                            if self.depth < 2 {
                                self.in_response = false;
                            }
                            self.pending = None;
                            self.colon = false;
                            self.at_key = false;
                            if self.depth == 0 {
                                self.state = St::Done;
                            }
                        }
                        b',' => {
                            self.at_key = self.watched();
                            self.pending = None;
                            self.colon = false;
                        }
                        b'[' => {
                            self.depth = self.depth.saturating_add(1);
                            self.pending = None;
                            self.colon = false;
                            self.at_key = false;
                        }
                        _ => {
                            self.pending = None;
                            self.colon = false;
                        }
                    }
                    i += 1;
                }
            }
        }
        if self.capture.is_some() {
            self.append(&chunk[cap_from..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(format: Format, body: &[u8]) -> Option<Usage> {
        let mut r = UsageReader::new(format);
        r.feed(body);
        r.finish()
    }

    #[test]
    fn counts_and_totals() {
        let u = |p, c, t| Some(Usage { prompt: p, completion: c, total: t });
        assert_eq!(Usage::parse(br#"{"prompt_tokens":3,"completion_tokens":4,"total_tokens":9}"#), u(3, 4, 9));
        assert_eq!(Usage::parse(br#"{"prompt_tokens":3,"completion_tokens":4}"#), u(3, 4, 7));
        assert_eq!(Usage::parse(br#"{"input_tokens":3,"output_tokens":4,"total_tokens":7}"#), u(3, 4, 7));
        assert_eq!(Usage::parse(br#"{"prompt_tokens":3,"total_tokens":3}"#), u(3, 0, 3));
        assert_eq!(Usage::parse(br#"{"prompt_tokens":18446744073709551615,"completion_tokens":1}"#), u(u64::MAX, 1, u64::MAX));
        // Not counts: float, negative, exponent, string, overflow, null.
        for bad in ["1.0", "-1", "1e2", "\"5\"", "18446744073709551616", "null", "-0", "[1]"] {
            let text = format!(r#"{{"prompt_tokens":{bad},"completion_tokens":2}}"#);
            assert_eq!(Usage::parse(text.as_bytes()), u(0, 2, 2), "{bad}");
        }
        assert_eq!(Usage::parse(br#"{}"#), None);
        assert_eq!(Usage::parse(br#"{"prompt_tokens":"x"}"#), None);
        assert_eq!(Usage::parse(br#"{"prompt_tokens":1,"prompt_tokens":2}"#), None);
        assert_eq!(Usage::parse(b"[1,2]"), None);
    }

    #[test]
    fn keys_are_decoded_and_exact() {
        assert_eq!(read(Format::Json, br#"{"us\u0061ge":{"prompt_tokens":1}}"#).map(|u| u.prompt), Some(1));
        assert_eq!(read(Format::Json, br#"{"\u0075\u0073\u0061\u0067\u0065":{"prompt_tokens":1}}"#).map(|u| u.prompt), Some(1));
        for key in ["usag", "usages", "Usage", "us\\u0041ge", "us\\\"age", "usage\\u0000", "usa\\u67e"] {
            let body = format!(r#"{{"{key}":{{"prompt_tokens":1}}}}"#);
            assert_eq!(read(Format::Json, body.as_bytes()), None, "{key}");
        }
        // `response` is only a container in SSE, and only at the top level.
        assert_eq!(read(Format::Json, br#"{"response":{"usage":{"prompt_tokens":1}}}"#), None);
        assert_eq!(read(Format::Sse, b"data: {\"x\":{\"response\":{\"usage\":{\"prompt_tokens\":1}}}}\n"), None);
        assert_eq!(read(Format::Sse, b"data: {\"response\":{\"x\":{\"usage\":{\"prompt_tokens\":1}}}}\n"), None);
        assert_eq!(read(Format::Sse, b"data: {\"response\":{\"usage\":{\"prompt_tokens\":1}}}\n").map(|u| u.prompt), Some(1));
        assert_eq!(read(Format::Sse, b"data: {\"response\":{},\"x\":{\"usage\":{\"prompt_tokens\":1}}}\n"), None);
    }

    #[test]
    fn buffer_is_allocated_once_at_the_bound() {
        let mut r = UsageReader::new(Format::Json);
        r.feed(br#"{"choices":[{"text":"usage"}],"id":"x"#);
        assert_eq!(r.buffered_bytes(), 0);
        r.feed(br#"","usage":{"prompt_tokens":1"#);
        assert_eq!(r.buffered_bytes(), MAX_USAGE_LEN);
        r.feed(b"}}");
        assert_eq!(r.buffered_bytes(), MAX_USAGE_LEN);
        assert_eq!(r.finish(), Some(Usage { prompt: 1, completion: 0, total: 1 }));
    }

    #[test]
    fn content_types() {
        assert_eq!(Format::from_content_type("text/event-stream"), Some(Format::Sse));
        assert_eq!(Format::from_content_type("Text/Event-Stream; charset=utf-8"), Some(Format::Sse));
        assert_eq!(Format::from_content_type(" application/json;charset=UTF-8"), Some(Format::Json));
        assert_eq!(Format::from_content_type("application/x-ndjson"), None);
        assert_eq!(Format::from_content_type(""), None);
    }
}
