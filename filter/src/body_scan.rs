//! Streaming scan of the request body for its top-level `model`, chunk by chunk as Envoy hands the
//! body over, so a worker never holds the whole body (wasm linear memory never shrinks: one 1 GB
//! body would pin 1 GB on that worker for its lifetime).
//!
//! [`Scanner`] is a complete, validating, incremental JSON parser (RFC 8259, serde_json's grammar)
//! that keeps O(1) state besides the decoded model name (at most [`MAX_MODEL_LEN`] bytes) and a
//! nesting stack of one bit per level (capped at [`MAX_DEPTH`] levels, 125 KB). No recursion, no
//! allocation per byte. Its verdicts are those of [`crate::body::extract_model`] on the whole body:
//! top-level keys are decoded (escapes) and compared with `model`; a second top-level `model` is
//! [`BodyError::DuplicateModel`] as soon as its key ends (where serde's derive refuses it); nested
//! `model` keys are data. Syntax errors are returned by [`Scanner::feed`] as soon as they are seen,
//! which is document order, like serde; the model's type, emptiness and length are judged at
//! [`Scanner::finish`], after the whole document proved valid, as serde does after parsing. A body
//! whose first byte is not `{` is scanned to the end too, to tell `NotObject` (valid JSON) from
//! `NotJson`, as `extract_model` does.
//!
//! Where the verdict knowingly differs from `extract_model` (kinds; messages always differ: ours
//! give a byte offset, serde's a line and column):
//! - Invalid UTF-8 inside a string that is skipped (not a top-level key, not the model): serde does
//!   not validate strings it ignores and accepts the body; the scanner refuses it (`NotJson`).
//! - Nesting deeper than [`MAX_DEPTH`]: serde skips any depth (its skip stack grows a byte per
//!   level); the scanner refuses (`NotJson`) to keep its memory bounded.
//! - A model value that is an array or object nested past serde's recursion limit (128 levels,
//!   the body's own object included), or that holds a number out of f64 range (`1e400`): serde
//!   builds a `Value` for the model and fails (`NotJson`: recursion limit, number out of range) and stops there (so a later duplicate `model` is not seen either);
//!   the scanner builds nothing and answers `ModelNotString` (or `DuplicateModel`), which is the
//!   true reason the body is refused.
//!
//! Escapes follow serde exactly: in strings serde decodes (top-level keys, the model value and
//! every string inside a non-string model value) a `\u` surrogate must be a high one followed at
//! once by `\u` and a low one; in strings it skips, lone surrogates pass (as in JavaScript's
//! `JSON.stringify` output and Python's `json`), only the four hex digits are checked.

use crate::body::{BodyError, MAX_MODEL_LEN};

/// Deepest nesting accepted (arrays and objects); the stack costs a bit per level.
pub const MAX_DEPTH: u32 = 1_000_000;

/// Scans a whole body at once; same verdict as feeding it in any chunks.
pub fn scan(body: &[u8]) -> Result<String, BodyError> {
    let mut s = Scanner::new();
    s.feed(body)?;
    s.finish()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

/// What the current string is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Validated and dropped; lone surrogates pass (serde's `ignore_str`).
    Skip,
    /// Validated like a decoded string (serde builds it into the model's `Value`), then dropped.
    Strict,
    /// A top-level key: decoded and compared with `model`.
    Key,
    /// The top-level model value: decoded into the bounded buffer.
    Model,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Before the top-level value.
    Start,
    /// A value must start (after `:`, or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ArrFirst,
    /// After `{`: a key or `}`.
    ObjFirst,
    /// After `,` in an object: a key.
    Key,
    Colon,
    /// After a value: `,`, the closing bracket, or (top level) only whitespace.
    After,
    Str,
    Escape,
    /// `left` hex digits of a `\u` escape to go; `high` is a pending high surrogate (strict kinds).
    Hex {
        left: u8,
        acc: u16,
        high: u16,
    },
    /// A high surrogate was decoded: `\u` and a low one must follow.
    LowSlash {
        high: u16,
    },
    LowU {
        high: u16,
    },
    /// Inside a multi-byte UTF-8 character split across chunks (bytes in `utf8`).
    Utf8,
    Num(Num),
    Lit {
        rest: &'static [u8],
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Model {
    Absent,
    Null,
    NotString,
    Str,
}

/// Incremental scanner; see the module doc. Feed chunks in order, then call [`Scanner::finish`].
/// After an error every call returns that error.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    kind: Kind,
    /// The current string is an object key (a `:` follows it).
    key: bool,
    /// Prefix of `model` the current top-level key matched so far; `KEY_MISMATCH` once it can't.
    key_at: u8,
    depth: u32,
    /// Stack bits (1 = object) of levels 0..64; deeper levels in `spill`.
    stack: u64,
    spill: Vec<u64>,
    in_obj: bool,
    root_obj: bool,
    model_seen: bool,
    /// The next value to start is the top-level model.
    model_next: bool,
    /// Inside the model value's array or object (its strings are strict).
    model_sub: bool,
    model: Model,
    model_too_long: bool,
    buf: Vec<u8>,
    utf8: [u8; 4],
    utf8_len: u8,
    /// Bytes fed before the current chunk (error positions).
    offset: u64,
    error: Option<BodyError>,
}

const KEY: &[u8] = b"model";
const KEY_MISMATCH: u8 = u8::MAX;

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner {
            state: State::Start,
            kind: Kind::Skip,
            key: false,
            key_at: 0,
            depth: 0,
            stack: 0,
            spill: Vec::new(),
            in_obj: false,
            root_obj: false,
            model_seen: false,
            model_next: false,
            model_sub: false,
            model: Model::Absent,
            model_too_long: false,
            buf: Vec::new(),
            utf8: [0; 4],
            utf8_len: 0,
            offset: 0,
            error: None,
        }
    }

    /// Scans the next chunk. An error is final: the body is refused whatever follows.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let r = self.run(chunk);
        self.offset = self.offset.saturating_add(chunk.len() as u64);
        if let Err(e) = &r {
            self.error = Some(e.clone());
        }
        r
    }

    /// The end of the body: the model, or why the body is refused.
    pub fn finish(self) -> Result<String, BodyError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let complete =
            self.depth == 0 && matches!(self.state, State::After | State::Num(Num::Zero | Num::Int | Num::Frac | Num::ExpDigits));
        if !complete {
            let what = match self.state {
                State::Start => "a value",
                State::Str | State::Escape | State::Hex { .. } | State::LowSlash { .. } | State::LowU { .. } | State::Utf8 => "a string",
                State::Num(_) | State::Lit { .. } => "a value",
                _ if self.in_obj => "an object",
                _ => "a list",
            };
            return Err(BodyError::NotJson(format!("EOF while parsing {what} at byte {}", self.offset)));
        }
        if !self.root_obj {
            return Err(BodyError::NotObject);
        }
        match self.model {
            Model::Absent | Model::Null => Err(BodyError::MissingModel),
            Model::NotString => Err(BodyError::ModelNotString),
            Model::Str if self.buf.is_empty() && !self.model_too_long => Err(BodyError::MissingModel),
            Model::Str if self.model_too_long => Err(BodyError::ModelTooLong),
            // Validated as it was decoded; the check can't fail.
            Model::Str => String::from_utf8(self.buf).map_err(|_| BodyError::NotJson("the model is not UTF-8".into())),
        }
    }

    fn syntax(&self, at: usize, what: &str) -> BodyError {
        BodyError::NotJson(format!("{what} at byte {}", self.offset.saturating_add(at as u64)))
    }

    fn run(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            match self.state {
                State::Str => {
                    // The bulk of a body is string bytes: take them in runs.
                    i = self.string_run(chunk, i)?;
                    continue;
                }
                State::After => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b',' if self.depth > 0 => self.state = if self.in_obj { State::Key } else { State::Value },
                    b'}' if self.depth > 0 && self.in_obj => self.pop(),
                    b']' if self.depth > 0 && !self.in_obj => self.pop(),
                    _ if self.depth == 0 => return Err(self.syntax(i, "trailing characters")),
                    _ if self.in_obj => return Err(self.syntax(i, "expected `,` or `}`")),
                    _ => return Err(self.syntax(i, "expected `,` or `]`")),
                },
                State::Value | State::Start => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    _ => {
                        if matches!(self.state, State::Start) {
                            self.root_obj = b == b'{';
                        }
                        self.begin_value(b, i)?;
                    }
                },
                State::ArrFirst => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b']' => self.pop(),
                    _ => self.begin_value(b, i)?,
                },
                State::ObjFirst => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b'"' => self.begin_key(),
                    b'}' => self.pop(),
                    _ => return Err(self.syntax(i, "key must be a string")),
                },
                State::Key => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b'"' => self.begin_key(),
                    b'}' => return Err(self.syntax(i, "trailing comma")),
                    _ => return Err(self.syntax(i, "key must be a string")),
                },
                State::Colon => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b':' => self.state = State::Value,
                    _ => return Err(self.syntax(i, "expected `:`")),
                },
                State::Escape => match simple_escape(b) {
                    Some(decoded) => {
                        self.emit(&[decoded]);
                        self.state = State::Str;
                    }
                    None if b == b'u' => self.state = State::Hex { left: 4, acc: 0, high: 0 },
                    None => return Err(self.syntax(i, "invalid escape")),
                },
                State::Hex { left, acc, high } => {
                    let Some(v) = hex_digit(b) else {
                        return Err(self.syntax(i, "invalid escape"));
                    };
                    let acc = (acc << 4) | u16::from(v);
                    if left > 1 {
                        self.state = State::Hex { left: left - 1, acc, high };
                    } else {
                        self.unicode(acc, high, i)?;
                    }
                }
                State::LowSlash { high } => match b {
                    b'\\' => self.state = State::LowU { high },
                    _ => return Err(self.syntax(i, "unexpected end of hex escape")),
                },
                State::LowU { high } => match b {
                    b'u' => self.state = State::Hex { left: 4, acc: 0, high },
                    _ => return Err(self.syntax(i, "unexpected end of hex escape")),
                },
                State::Utf8 => {
                    if let Some(slot) = self.utf8.get_mut(usize::from(self.utf8_len)) {
                        *slot = b;
                    }
                    self.utf8_len += 1;
                    let ch = self.utf8;
                    let ch = ch.get(..usize::from(self.utf8_len)).unwrap_or_default();
                    match utf8_char(ch) {
                        Utf8::Incomplete => {}
                        Utf8::Valid => {
                            self.emit(ch);
                            self.state = State::Str;
                        }
                        Utf8::Invalid => {
                            // Named at the character's first byte, as when it comes in one chunk.
                            let lead = (self.offset + i as u64 + 1).saturating_sub(u64::from(self.utf8_len));
                            return Err(BodyError::NotJson(format!("invalid UTF-8 in a string at byte {lead}")));
                        }
                    }
                }
                State::Num(n) => {
                    let next = match (n, b) {
                        (Num::Minus, b'0') => Num::Zero,
                        (Num::Minus, b'1'..=b'9') => Num::Int,
                        (Num::Int, b'0'..=b'9') | (Num::Frac, b'0'..=b'9') | (Num::ExpDigits, b'0'..=b'9') => n,
                        (Num::Zero | Num::Int, b'.') => Num::Dot,
                        (Num::Dot, b'0'..=b'9') => Num::Frac,
                        (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
                        (Num::Exp, b'+' | b'-') => Num::ExpSign,
                        (Num::Exp | Num::ExpSign, b'0'..=b'9') => Num::ExpDigits,
                        (Num::Zero, b'0'..=b'9') => {
                            // serde: only one leading zero.
                            return Err(self.syntax(i, "invalid number"));
                        }
                        (Num::Zero | Num::Int | Num::Frac | Num::ExpDigits, _) => {
                            // The number ended: this byte belongs to what follows it.
                            self.state = State::After;
                            continue;
                        }
                        _ => return Err(self.syntax(i, "invalid number")),
                    };
                    self.state = State::Num(next);
                }
                State::Lit { rest } => match rest.split_first() {
                    Some((&want, tail)) if want == b => {
                        self.state = if tail.is_empty() { State::After } else { State::Lit { rest: tail } };
                    }
                    _ => return Err(self.syntax(i, "expected ident")),
                },
            }
            i += 1;
        }
        Ok(())
    }

    /// Consumes string bytes from `start`: runs of plain bytes, whole characters and escapes, until
    /// the string ends, the chunk ends, or an escape or character is cut by the chunk's end (then the
    /// state machine takes over). Returns the index after what it consumed.
    fn string_run(&mut self, chunk: &[u8], start: usize) -> Result<usize, BodyError> {
        let mut at = start;
        loop {
            let rest = chunk.get(at..).unwrap_or_default();
            let n = special_len::<true>(rest);
            let (plain, rest) = rest.split_at_checked(n).unwrap_or((rest, &[]));
            self.emit(plain);
            at += n;
            let Some(&b) = rest.first() else { return Ok(at) };
            match b {
                b'"' => {
                    self.end_string()?;
                    return Ok(at + 1);
                }
                b'\\' => match rest.get(1).copied().and_then(simple_escape) {
                    Some(decoded) => {
                        self.emit(&[decoded]);
                        at += 2;
                    }
                    None => match (rest.get(1), rest.get(2..6).and_then(hex4)) {
                        (Some(b'u'), Some(cp)) => {
                            self.unicode(cp, 0, at + 5)?;
                            at += 6;
                            if !matches!(self.state, State::Str) {
                                return Ok(at);
                            }
                        }
                        // Cut by the chunk's end, or an error: the state machine says which, at the same byte.
                        _ => {
                            self.state = State::Escape;
                            return Ok(at + 1);
                        }
                    },
                },
                // Text with non-ASCII: up to the next quote, backslash or control, validated by std.
                0x80.. => {
                    let n = special_len::<false>(rest);
                    let (text, tail) = rest.split_at_checked(n).unwrap_or((rest, &[]));
                    match std::str::from_utf8(text) {
                        Ok(_) => {
                            self.emit(text);
                            at += n;
                        }
                        // A character cut by the end of the chunk: carried into the next one (< 4 bytes).
                        Err(e) if e.error_len().is_none() && tail.is_empty() => {
                            let (valid, cut) = text.split_at_checked(e.valid_up_to()).unwrap_or((text, &[]));
                            self.emit(valid);
                            let mut utf8 = [0; 4];
                            for (slot, &c) in utf8.iter_mut().zip(cut) {
                                *slot = c;
                            }
                            self.utf8 = utf8;
                            self.utf8_len = cut.len().min(3) as u8;
                            self.state = State::Utf8;
                            return Ok(chunk.len());
                        }
                        Err(e) => return Err(self.syntax(at + e.valid_up_to(), "invalid UTF-8 in a string")),
                    }
                }
                _ => return Err(self.syntax(at, "control character (\\u0000-\\u001F) found while parsing a string")),
            }
        }
    }

    /// A complete `\uXXXX` (`cp`), with a pending high surrogate `high` (0 = none).
    fn unicode(&mut self, cp: u16, high: u16, at: usize) -> Result<(), BodyError> {
        self.state = State::Str;
        if self.kind == Kind::Skip {
            return Ok(());
        }
        let low = (0xdc00..=0xdfff).contains(&cp);
        let scalar = if high != 0 {
            if !low {
                return Err(self.syntax(at, "lone leading surrogate in hex escape"));
            }
            0x10000 + ((u32::from(high) - 0xd800) << 10) + (u32::from(cp) - 0xdc00)
        } else if low {
            return Err(self.syntax(at, "lone leading surrogate in hex escape"));
        } else if (0xd800..=0xdbff).contains(&cp) {
            self.state = State::LowSlash { high: cp };
            return Ok(());
        } else {
            u32::from(cp)
        };
        let Some(c) = char::from_u32(scalar) else {
            return Err(self.syntax(at, "invalid unicode code point"));
        };
        let mut tmp = [0; 4];
        self.emit(c.encode_utf8(&mut tmp).as_bytes());
        Ok(())
    }

    /// Decoded string bytes: compared with `model` (top-level keys) or kept (the model, bounded).
    #[inline]
    fn emit(&mut self, bytes: &[u8]) {
        match self.kind {
            Kind::Skip | Kind::Strict => {}
            Kind::Key => {
                if self.key_at != KEY_MISMATCH {
                    let want = KEY.get(usize::from(self.key_at)..).unwrap_or_default();
                    self.key_at = if want.starts_with(bytes) { self.key_at + bytes.len() as u8 } else { KEY_MISMATCH };
                }
            }
            Kind::Model if self.model_too_long => {}
            Kind::Model if self.buf.len() + bytes.len() > MAX_MODEL_LEN => {
                // Refused at the end; nothing more of it is kept.
                self.model_too_long = true;
                self.buf = Vec::new();
            }
            Kind::Model => self.buf.extend_from_slice(bytes),
        }
    }

    fn begin_key(&mut self) {
        self.key = true;
        self.state = State::Str;
        self.kind = if self.depth == 1 && self.root_obj {
            self.key_at = 0;
            Kind::Key
        } else if self.model_sub {
            Kind::Strict
        } else {
            Kind::Skip
        };
    }

    fn end_string(&mut self) -> Result<(), BodyError> {
        if !self.key {
            self.state = State::After;
            return Ok(());
        }
        if self.kind == Kind::Key && usize::from(self.key_at) == KEY.len() {
            // Refused at the key, like serde's derive: which one a provider honours is undefined.
            if self.model_seen {
                return Err(BodyError::DuplicateModel);
            }
            self.model_seen = true;
            self.model_next = true;
        }
        self.state = State::Colon;
        Ok(())
    }

    fn begin_value(&mut self, b: u8, at: usize) -> Result<(), BodyError> {
        let is_model = std::mem::take(&mut self.model_next);
        if is_model {
            self.model = match b {
                b'"' => Model::Str,
                b'n' => Model::Null,
                _ => Model::NotString,
            };
        }
        self.state = match b {
            b'{' | b'[' => {
                let obj = b == b'{';
                self.push(obj, at)?;
                self.model_sub |= is_model;
                if obj {
                    State::ObjFirst
                } else {
                    State::ArrFirst
                }
            }
            b'"' => {
                self.key = false;
                self.kind = if is_model {
                    // One allocation, never grown: `emit` keeps at most MAX_MODEL_LEN bytes.
                    self.buf = Vec::with_capacity(MAX_MODEL_LEN);
                    Kind::Model
                } else if self.model_sub {
                    Kind::Strict
                } else {
                    Kind::Skip
                };
                State::Str
            }
            b'-' => State::Num(Num::Minus),
            b'0' => State::Num(Num::Zero),
            b'1'..=b'9' => State::Num(Num::Int),
            b't' => State::Lit { rest: b"rue" },
            b'f' => State::Lit { rest: b"alse" },
            b'n' => State::Lit { rest: b"ull" },
            _ => return Err(self.syntax(at, "expected value")),
        };
        Ok(())
    }

    fn push(&mut self, obj: bool, at: usize) -> Result<(), BodyError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.syntax(at, &format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        let d = self.depth;
        if d < 64 {
            self.stack = (self.stack & !(1 << d)) | (u64::from(obj) << d);
        } else {
            let (word, bit) = (((d - 64) / 64) as usize, (d - 64) % 64);
            if self.spill.len() <= word {
                self.spill.push(0);
            }
            if let Some(w) = self.spill.get_mut(word) {
                *w = (*w & !(1 << bit)) | (u64::from(obj) << bit);
            }
        }
        self.depth = d + 1;
        self.in_obj = obj;
        Ok(())
    }

    /// Closes the innermost array or object (the caller checked there is one).
    fn pop(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        self.state = State::After;
        if self.depth <= 1 {
            self.model_sub = false;
        }
        self.in_obj = match self.depth.checked_sub(1) {
            None => false,
            Some(d) if d < 64 => (self.stack >> d) & 1 == 1,
            Some(d) => self.spill.get(((d - 64) / 64) as usize).is_some_and(|w| (w >> ((d - 64) % 64)) & 1 == 1),
        };
    }
}

fn simple_escape(c: u8) -> Option<u8> {
    match c {
        b'"' | b'\\' | b'/' => Some(c),
        b'b' => Some(0x08),
        b'f' => Some(0x0c),
        b'n' => Some(b'\n'),
        b'r' => Some(b'\r'),
        b't' => Some(b'\t'),
        _ => None,
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex4(s: &[u8]) -> Option<u16> {
    s.iter().try_fold(0u16, |acc, &c| Some((acc << 4) | u16::from(hex_digit(c)?)))
}

enum Utf8 {
    Valid,
    /// A valid prefix of a character.
    Incomplete,
    Invalid,
}

/// The UTF-8 character `s` starts with (RFC 3629: no overlongs, no surrogates, at most U+10FFFF).
fn utf8_char(s: &[u8]) -> Utf8 {
    let Some(&lead) = s.first() else { return Utf8::Incomplete };
    let (width, lo, hi) = match lead {
        0xc2..=0xdf => (2, 0x80, 0xbf),
        0xe0 => (3, 0xa0, 0xbf),
        0xe1..=0xec | 0xee..=0xef => (3, 0x80, 0xbf),
        0xed => (3, 0x80, 0x9f),
        0xf0 => (4, 0x90, 0xbf),
        0xf1..=0xf3 => (4, 0x80, 0xbf),
        0xf4 => (4, 0x80, 0x8f),
        _ => return Utf8::Invalid,
    };
    for k in 1..width {
        let Some(&c) = s.get(k) else { return Utf8::Incomplete };
        let (lo, hi) = if k == 1 { (lo, hi) } else { (0x80, 0xbf) };
        if !(lo..=hi).contains(&c) {
            return Utf8::Invalid;
        }
    }
    Utf8::Valid
}

/// Length of the prefix of `s` with no `"`, `\`, control character, nor (if `NON_ASCII`) byte
/// above 0x7f. serde's word-at-a-time trick: the lowest flagged byte is exact (borrows only flag
/// bytes above a true hit).
#[inline]
fn special_len<const NON_ASCII: bool>(s: &[u8]) -> usize {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES << 7;
    let mut words = s.chunks_exact(8);
    let mut done = 0;
    for w in words.by_ref() {
        let Ok(w) = <[u8; 8]>::try_from(w) else { break };
        let x = u64::from_le_bytes(w);
        let ctrl = x.wrapping_sub(ONES * 0x20) & !x;
        let q = x ^ (ONES * u64::from(b'"'));
        let quote = q.wrapping_sub(ONES) & !q;
        let bs = x ^ (ONES * u64::from(b'\\'));
        let backslash = bs.wrapping_sub(ONES) & !bs;
        let high = if NON_ASCII { x } else { 0 };
        let hit = (ctrl | quote | backslash | high) & HIGH;
        if hit != 0 {
            return done + (hit.trailing_zeros() / 8) as usize;
        }
        done += 8;
    }
    let tail = words.remainder();
    done + tail.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20 || (NON_ASCII && b >= 0x80)).unwrap_or(tail.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::extract_model;

    fn bytewise(body: &[u8]) -> Result<String, BodyError> {
        let mut s = Scanner::new();
        for b in body {
            s.feed(std::slice::from_ref(b))?;
        }
        s.finish()
    }

    fn both(body: &[u8]) -> Result<String, BodyError> {
        let whole = scan(body);
        assert_eq!(whole, bytewise(body), "whole vs byte-by-byte on {:?}", String::from_utf8_lossy(body));
        whole
    }

    #[test]
    fn extracts_top_level_model_only() {
        let b = br#"{"messages":[{"role":"user","content":"hi","model":"inner"}],"model":"gpt-4o","stream":true}"#;
        assert_eq!(both(b), Ok("gpt-4o".into()));
        assert_eq!(both(br#"  {"model":"a\u00e9"}"#), Ok("aé".into()));
        assert_eq!(both(br#"{"mod\u0065l":"x\ud83d\ude00\n\/"}"#), Ok("x\u{1F600}\n/".into()));
        assert_eq!(both("{\"model\":\"é中😀\"}".as_bytes()), Ok("é中😀".into()));
        assert_eq!(both(br#"{"a":{"model":1},"b":[{"model":2}],"model":"m"}"#), Ok("m".into()));
    }

    #[test]
    fn refusals_match_extract_model() {
        let long = format!("{{\"model\":\"{}\"}}", "x".repeat(MAX_MODEL_LEN + 1));
        let exact = format!("{{\"model\":\"{}\"}}", "x".repeat(MAX_MODEL_LEN));
        let cases: Vec<&[u8]> = vec![
            b"not json",
            b"",
            b"  \n",
            br#"{"model":"x""#,
            b"[1,2]",
            b"[1,2",
            b"\"s\"",
            b"1",
            b"-0.5e+3",
            b"01",
            b"{}",
            br#"{"model":null}"#,
            br#"{"model":""}"#,
            br#"{"model":4}"#,
            br#"{"model":["a"]}"#,
            br#"{"model":{"a":"b"}}"#,
            br#"{"model":true}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"model":"a","model""#,
            br#"{"model":"a","mod\u0065l":1}"#,
            br#"{"model":4,"x":}"#,
            br#"{"model":"a"} x"#,
            br#"{"model":"a",}"#,
            br#"{"model":"a\q"}"#,
            br#"{"model":"a\ud800"}"#,
            br#"{"model":"a\udc00"}"#,
            br#"{"model":"a\ud800\u0041"}"#,
            br#"{"model":["\ud800"]}"#,
            br#"{"model":"a","x":"\ud800"}"#,
            br#"{"x\ud800":1,"model":"a"}"#,
            b"[\"\\udc00\"]",
            b"{\"model\":\"a\tb\"}",
            b"\x0c{\"model\":\"a\"}",
            br#"{"model":"a","n":[1.,2]}"#,
            br#"{"model":"a","n":.5}"#,
            br#"{"model":"a","n":+1}"#,
            br#"{"model":"a","n":1e}"#,
            br#"{"model":"a","n":tru}"#,
            br#"{"model":"a","n":nulL}"#,
            long.as_bytes(),
            exact.as_bytes(),
        ];
        for body in cases {
            let want = extract_model(body);
            let got = both(body);
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{:?}: {got:?} vs {want:?}",
                String::from_utf8_lossy(body)
            );
            if want.is_ok() {
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn deep_nesting_is_bounded_and_not_recursive() {
        let deep = format!("{{\"model\":\"m\",\"x\":{}1{}}}", "[{\"a\":".repeat(50_000), "}]".repeat(50_000));
        assert_eq!(extract_model(deep.as_bytes()), Ok("m".into()));
        assert_eq!(both(deep.as_bytes()), Ok("m".into()));
        // Where serde refuses (recursion limit building the model's Value), the scanner names the real problem.
        let deep_model = format!("{{\"model\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(both(deep_model.as_bytes()), Err(BodyError::ModelNotString));
        let mut s = Scanner::new();
        let open = vec![b'['; MAX_DEPTH as usize];
        assert_eq!(s.feed(&open), Ok(()));
        assert!(s.spill.len() <= MAX_DEPTH as usize / 64, "a bit per level");
        match s.feed(b"[") {
            Err(BodyError::NotJson(m)) => assert!(m.contains("nesting deeper than 1000000"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.finish(), Err(BodyError::NotJson(_))), "errors are final");
    }

    #[test]
    fn model_buffer_is_bounded() {
        let mut s = Scanner::new();
        assert_eq!(s.feed(b"{\"model\":\""), Ok(()));
        for _ in 0..1000 {
            assert_eq!(s.feed(&[b'x'; 100]), Ok(()));
            assert!(s.buf.len() <= MAX_MODEL_LEN && s.buf.capacity() <= MAX_MODEL_LEN);
        }
        assert_eq!(s.feed(b"\"}"), Ok(()));
        assert_eq!(s.finish(), Err(BodyError::ModelTooLong));
        // Multi-byte characters at the limit: 128 two-byte characters fit, one more does not.
        let fits = format!("{{\"model\":\"{}\"}}", "é".repeat(MAX_MODEL_LEN / 2));
        assert_eq!(both(fits.as_bytes()), Ok("é".repeat(MAX_MODEL_LEN / 2)));
        let over = format!("{{\"model\":\"{}\\u00e9\"}}", "é".repeat(MAX_MODEL_LEN / 2));
        assert_eq!(both(over.as_bytes()), Err(BodyError::ModelTooLong));
    }

    #[test]
    fn utf8_is_validated_everywhere() {
        for body in [
            &b"{\"model\":\"a\",\"x\":\"\xff\"}"[..],
            b"{\"model\":\"a\",\"x\":\"\xc3\"}",
            b"{\"model\":\"a\",\"x\":\"\xed\xa0\x80\"}",
            b"{\"model\":\"a\",\"x\":\"\xc0\xaf\"}",
            b"{\"model\":\"a\",\"x\":\"\xf4\x90\x80\x80\"}",
            b"{\"model\":\"\xe4\xb8\"}",
            b"[\"\xe4\xb8\xad\xe4\"]",
            b"{\"model\":\"a\",\"x\":1\xc3\xa9}",
        ] {
            assert!(matches!(both(body), Err(BodyError::NotJson(_))), "{body:?}");
        }
    }

    #[test]
    fn errors_are_early_and_sticky() {
        let mut s = Scanner::new();
        assert_eq!(s.feed(br#"{"model":"a","#), Ok(()));
        assert_eq!(s.feed(br#""model""#), Err(BodyError::DuplicateModel), "refused at the key, before its value arrives");
        assert_eq!(s.feed(b"}"), Err(BodyError::DuplicateModel));
        let mut s = Scanner::new();
        match s.feed(b"{\"a\":1}\n  x") {
            Err(BodyError::NotJson(m)) => assert_eq!(m, "trailing characters at byte 10"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn special_len_finds_the_first_special_byte() {
        let base = b"abcdefghijklmnopqrstuvwxyz0123456789".to_vec();
        for at in 0..base.len() {
            for special in [b'"', b'\\', 0x00, 0x1f, b'\n', 0x80, 0xc3, 0xff] {
                let mut s = base.clone();
                s[at] = special;
                // Specials after the first one (borrows in the word trick) don't move it.
                if let Some(next) = s.get_mut(at + 1) {
                    *next = 0x00;
                }
                assert_eq!(special_len::<true>(&s), at);
                if special < 0x80 {
                    assert_eq!(special_len::<false>(&s), at);
                }
            }
            // Plain: everything from 0x20 to 0x7f but the quote and the backslash.
            let mut s = base.clone();
            s[at] = 0x7f;
            s[(at + 1) % base.len()] = b' ';
            assert_eq!(special_len::<true>(&s), base.len());
            s[at] = 0xe4;
            assert_eq!(special_len::<false>(&s), base.len());
        }
    }
}
