//! HTTP content codings for the mock and the e2e client (the reference encoders: flate2, brotli,
//! libzstd): whole-body encode/decode, and a streaming compressor that flushes every chunk so a
//! compressed SSE stream still arrives event by event.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coding {
    Gzip,
    /// zlib (RFC 1950), as `deflate` means in HTTP.
    Deflate,
    Br,
    Zstd,
}

impl Coding {
    pub const ALL: [Coding; 4] = [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd];

    pub fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Br => "br",
            Coding::Zstd => "zstd",
        }
    }

    /// A `Content-Encoding` value: None for identity (or none), Err for a coding we don't know.
    pub fn parse(value: Option<&str>) -> Result<Option<Coding>, String> {
        let v = value.unwrap_or("").trim().to_ascii_lowercase();
        match v.as_str() {
            "" | "identity" => Ok(None),
            "gzip" | "x-gzip" => Ok(Some(Coding::Gzip)),
            "deflate" => Ok(Some(Coding::Deflate)),
            "br" => Ok(Some(Coding::Br)),
            "zstd" => Ok(Some(Coding::Zstd)),
            other => Err(format!("unsupported content-encoding {other:?}")),
        }
    }

    /// Whether an `Accept-Encoding` value allows this coding (by name or `*`, with q > 0).
    pub fn accepted_by(self, accept_encoding: &str) -> bool {
        accept_encoding.split(',').any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q = parts.filter_map(|p| p.trim().strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok())).next().unwrap_or(1.0);
            q > 0.0
                && (name.eq_ignore_ascii_case(self.name()) || name == "*" || (self == Coding::Gzip && name.eq_ignore_ascii_case("x-gzip")))
        })
    }
}

pub fn encode(coding: Coding, data: &[u8]) -> Vec<u8> {
    let mut c = Compressor::new(coding);
    let mut out = c.push(data);
    out.extend(c.finish());
    out
}

pub fn decode(coding: Coding, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let r = match coding {
        Coding::Gzip => flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out),
        Coding::Deflate => {
            // zlib, or raw deflate from clients that send that.
            let r = flate2::read::ZlibDecoder::new(data).read_to_end(&mut out);
            if r.is_err() {
                out.clear();
                flate2::read::DeflateDecoder::new(data).read_to_end(&mut out)
            } else {
                r
            }
        }
        Coding::Br => brotli::Decompressor::new(data, 4096).read_to_end(&mut out),
        Coding::Zstd => zstd::stream::read::Decoder::new(data).and_then(|mut d| d.read_to_end(&mut out)),
    };
    r.map(|_| out).map_err(|e| format!("the {} body does not decode: {e}", coding.name()))
}

/// Compresses a stream chunk by chunk; each `push` returns what a flush made of it.
pub enum Compressor {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::Encoder<'static, Vec<u8>>),
}

impl Compressor {
    pub fn new(coding: Coding) -> Compressor {
        let level = flate2::Compression::default();
        match coding {
            Coding::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            Coding::Deflate => Compressor::Deflate(flate2::write::ZlibEncoder::new(Vec::new(), level)),
            Coding::Br => Compressor::Br(Box::new(brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22))),
            Coding::Zstd => Compressor::Zstd(zstd::stream::Encoder::new(Vec::new(), 3).expect("zstd encoder")),
        }
    }

    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        fn step<W: Write>(w: &mut W, data: &[u8]) {
            w.write_all(data).and_then(|_| w.flush()).expect("in-memory compression");
        }
        match self {
            Compressor::Gzip(e) => {
                step(e, data);
                std::mem::take(e.get_mut())
            }
            Compressor::Deflate(e) => {
                step(e, data);
                std::mem::take(e.get_mut())
            }
            Compressor::Br(e) => {
                step(e.as_mut(), data);
                std::mem::take(e.get_mut())
            }
            Compressor::Zstd(e) => {
                step(e, data);
                std::mem::take(e.get_mut())
            }
        }
    }

    pub fn finish(self) -> Vec<u8> {
        match self {
            Compressor::Gzip(e) => e.finish().expect("gzip"),
            Compressor::Deflate(e) => e.finish().expect("zlib"),
            Compressor::Br(e) => e.into_inner(),
            Compressor::Zstd(e) => e.finish().expect("zstd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_streams_and_accept_encoding() {
        let text = b"data: {\"choices\":[]}\n\n".repeat(20);
        for c in Coding::ALL {
            assert_eq!(decode(c, &encode(c, &text)).unwrap(), text, "{c:?}");
            let mut s = Compressor::new(c);
            let mut parts: Vec<Vec<u8>> = text.chunks(22).map(|ch| s.push(ch)).collect();
            assert!(parts.iter().all(|p| !p.is_empty()), "{c:?}: every chunk is flushed");
            parts.push(s.finish());
            assert_eq!(decode(c, &parts.concat()).unwrap(), text, "{c:?}");
            assert!(decode(c, b"plain").is_err(), "{c:?}");
        }
        assert!(Coding::Gzip.accepted_by("gzip, deflate"));
        assert!(Coding::Br.accepted_by("gzip, deflate, br, zstd"));
        assert!(Coding::Zstd.accepted_by("*"));
        assert!(!Coding::Br.accepted_by("gzip, br;q=0"));
        assert!(!Coding::Gzip.accepted_by("identity"));
        assert!(!Coding::Gzip.accepted_by(""));
        assert_eq!(Coding::parse(Some("GZIP")), Ok(Some(Coding::Gzip)));
        assert_eq!(Coding::parse(None), Ok(None));
        assert!(Coding::parse(Some("compress")).is_err());
    }
}
