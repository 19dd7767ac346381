//! The streaming decoder for compressed bodies: every coding against the reference encoders
//! (flate2, brotli, libzstd), split at every chunk boundary, corrupt and cut input, the cap, bombs
//! and window limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use filter::content_encoding::{Coding, DecodeError, Decoder, Encoding, MAX_WINDOW, OUT_CHUNK};
use std::io::Write;
use std::time::{Duration, Instant};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn br(data: &[u8], lgwin: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 9, lgwin);
        w.write_all(data).unwrap();
    }
    out
}

fn zst(data: &[u8], checksum: bool) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    e.include_checksum(checksum).unwrap();
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Feeds `input` in `chunks` pieces and finishes; the decoded bytes or the first error.
fn decode(coding: Coding, chunks: &[&[u8]], cap: u64) -> Result<Vec<u8>, DecodeError> {
    let mut d = Decoder::new(coding, cap);
    let mut out = Vec::new();
    for c in chunks {
        d.feed(c, |piece| {
            assert!(!piece.is_empty() && piece.len() <= OUT_CHUNK, "pieces are non-empty and bounded: {}", piece.len());
            out.extend_from_slice(piece);
            true
        })?;
    }
    d.finish()?;
    assert_eq!(d.produced(), out.len() as u64);
    Ok(out)
}

fn whole(coding: Coding, input: &[u8]) -> Result<Vec<u8>, DecodeError> {
    decode(coding, &[input], u64::MAX)
}

const TEXT: &[u8] =
    br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello hello hello hello, compressed world"}],"stream":true}"#;

fn samples() -> Vec<(Coding, &'static str, Vec<u8>)> {
    vec![
        (Coding::Gzip, "gzip", gzip(TEXT)),
        (Coding::Deflate, "zlib", zlib(TEXT)),
        (Coding::Deflate, "raw deflate", raw_deflate(TEXT)),
        (Coding::Br, "br", br(TEXT, 22)),
        (Coding::Zstd, "zstd", zst(TEXT, false)),
        (Coding::Zstd, "zstd with checksum", zst(TEXT, true)),
    ]
}

#[test]
fn every_coding_decodes_whole_split_at_every_boundary_and_byte_by_byte() {
    for (coding, name, enc) in samples() {
        assert_eq!(whole(coding, &enc).as_deref(), Ok(TEXT), "{name}");
        for split in 0..=enc.len() {
            let (a, b) = enc.split_at(split);
            assert_eq!(decode(coding, &[a, b], u64::MAX).as_deref(), Ok(TEXT), "{name} split at {split}");
        }
        for a in 0..enc.len() {
            for b in (a..enc.len()).step_by(5) {
                let parts = [&enc[..a], &enc[a..b], &enc[b..]];
                assert_eq!(decode(coding, &parts, u64::MAX).as_deref(), Ok(TEXT), "{name} split at {a} and {b}");
            }
        }
        let bytes: Vec<&[u8]> = enc.chunks(1).collect();
        assert_eq!(decode(coding, &bytes, u64::MAX).as_deref(), Ok(TEXT), "{name} byte by byte");
    }
}

#[test]
fn large_bodies_come_out_in_bounded_pieces() {
    // 3 MB of varied JSON-ish text: many output pieces, several zstd blocks and deflate blocks.
    let data: Vec<u8> =
        (0..3_000_000u32).map(|i| b"abcdefghij{}[]\":, 0123456789"[(i.wrapping_mul(2_654_435_761) >> 24) as usize % 28]).collect();
    for (coding, enc) in
        [(Coding::Gzip, gzip(&data)), (Coding::Deflate, zlib(&data)), (Coding::Br, br(&data, 22)), (Coding::Zstd, zst(&data, true))]
    {
        let chunks: Vec<&[u8]> = enc.chunks(64 * 1024).collect();
        assert_eq!(decode(coding, &chunks, u64::MAX).unwrap(), data, "{coding:?}");
    }
}

#[test]
fn gzip_optional_header_fields_are_skipped_and_checked() {
    let mut e = flate2::GzBuilder::new()
        .filename("a-very-long-file-name.json")
        .comment("a comment")
        .extra(vec![1, 2, 3, 4])
        .write(Vec::new(), flate2::Compression::default());
    e.write_all(TEXT).unwrap();
    let enc = e.finish().unwrap();
    assert_eq!(enc[3] & 0x1c, 0x1c, "FEXTRA, FNAME and FCOMMENT set");
    for split in 0..enc.len() {
        assert_eq!(decode(Coding::Gzip, &[&enc[..split], &enc[split..]], u64::MAX).as_deref(), Ok(TEXT), "split at {split}");
    }
    // FHCRC: the header's CRC-16 after the fixed 10 bytes (flate2 does not write one).
    let plain = gzip(TEXT);
    let mut with_hcrc = plain[..10].to_vec();
    with_hcrc[3] |= 0x02;
    let crc = crc32fast::hash(&with_hcrc) as u16;
    with_hcrc.extend_from_slice(&crc.to_le_bytes());
    with_hcrc.extend_from_slice(&plain[10..]);
    assert_eq!(whole(Coding::Gzip, &with_hcrc).as_deref(), Ok(TEXT));
    let mut bad = with_hcrc.clone();
    bad[10] ^= 1;
    assert!(matches!(whole(Coding::Gzip, &bad), Err(DecodeError::Corrupt { coding: Coding::Gzip, .. })));
}

#[test]
fn gzip_members_follow_each_other() {
    let mut two = gzip(b"{\"model\":");
    two.extend_from_slice(&gzip(b"\"m\"}"));
    assert_eq!(whole(Coding::Gzip, &two).as_deref(), Ok(&b"{\"model\":\"m\"}"[..]));
    for split in 0..two.len() {
        assert_eq!(decode(Coding::Gzip, &[&two[..split], &two[split..]], u64::MAX).as_deref(), Ok(&b"{\"model\":\"m\"}"[..]));
    }
}

#[test]
fn zstd_frames_follow_each_other_and_skippable_frames_are_skipped() {
    let mut enc = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9];
    enc.extend_from_slice(&zst(b"{\"model\":", true));
    enc.extend_from_slice(&[0x5f, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]);
    enc.extend_from_slice(&zst(b"\"m\"}", false));
    for split in 0..enc.len() {
        assert_eq!(decode(Coding::Zstd, &[&enc[..split], &enc[split..]], u64::MAX).as_deref(), Ok(&b"{\"model\":\"m\"}"[..]), "{split}");
    }
}

fn is_corrupt(r: &Result<Vec<u8>, DecodeError>, coding: Coding) -> bool {
    matches!(r, Err(DecodeError::Corrupt { coding: c, .. }) if *c == coding)
}

#[test]
fn corrupt_cut_and_trailing_input_is_refused() {
    for (coding, name, enc) in samples() {
        // Cut anywhere: the stream never ends.
        for cut in 0..enc.len() {
            let r = whole(coding, &enc[..cut]);
            assert!(is_corrupt(&r, coding), "{name} cut at {cut}: {r:?}");
        }
        // Data after the end.
        let mut trailing = enc.clone();
        trailing.extend_from_slice(b"garbage");
        assert!(is_corrupt(&whole(coding, &trailing), coding), "{name} with trailing data");
        // Not this coding at all.
        assert!(is_corrupt(&whole(coding, TEXT), coding) || coding == Coding::Deflate, "{name}: plain JSON");
    }
    // Integrity checks: gzip's CRC-32 and size, zlib's Adler-32, zstd's checksum.
    for (coding, enc, at) in [
        (Coding::Gzip, gzip(TEXT), 8usize),
        (Coding::Gzip, gzip(TEXT), 3),
        (Coding::Deflate, zlib(TEXT), 1),
        (Coding::Zstd, zst(TEXT, true), 2),
    ] {
        let mut bad = enc.clone();
        let i = bad.len() - at;
        bad[i] ^= 0x40;
        assert!(is_corrupt(&whole(coding, &bad), coding), "{coding:?} with byte -{at} flipped");
    }
    assert!(is_corrupt(&whole(Coding::Gzip, b"\x1f\x8b\x09\x00"), Coding::Gzip), "not deflate inside");
    assert!(is_corrupt(&whole(Coding::Gzip, b""), Coding::Gzip), "empty");
    assert!(is_corrupt(&whole(Coding::Zstd, b""), Coding::Zstd), "empty");
    assert!(is_corrupt(&whole(Coding::Br, b""), Coding::Br), "empty");
}

#[test]
fn random_corruption_never_panics_and_is_an_error_or_some_bytes() {
    for (coding, name, enc) in samples() {
        for i in 0..enc.len() {
            for bit in [0x01u8, 0x10, 0x80] {
                let mut bad = enc.clone();
                bad[i] ^= bit;
                // Either refused, or (where the format has no check on that byte) decoded to something.
                if let Ok(out) = whole(coding, &bad) {
                    assert!(out.len() < 1 << 20, "{name} byte {i}");
                }
            }
        }
    }
}

#[test]
fn the_cap_is_exact_and_stops_decoding() {
    for (coding, name, enc) in samples() {
        let n = TEXT.len() as u64;
        assert_eq!(decode(coding, &[&enc], n).as_deref(), Ok(TEXT), "{name}: exactly the cap");
        assert_eq!(decode(coding, &[&enc], n - 1), Err(DecodeError::TooLarge), "{name}: one byte over");
        let mut d = Decoder::new(coding, n - 1);
        let mut got = 0;
        assert_eq!(
            d.feed(&enc, |p| {
                got += p.len();
                true
            }),
            Err(DecodeError::TooLarge)
        );
        assert!(got < TEXT.len(), "{name}: no byte past the cap reached the sink");
        assert_eq!(d.feed(b"more", |_| panic!("no output after an error")), Err(DecodeError::TooLarge), "the error sticks");
        assert_eq!(d.finish(), Err(DecodeError::TooLarge));
    }
}

#[test]
fn a_sink_can_stop_the_decoding() {
    let data = vec![b'x'; 10 * OUT_CHUNK];
    let enc = gzip(&data);
    let mut d = Decoder::new(Coding::Gzip, u64::MAX);
    let mut pieces = 0;
    assert_eq!(
        d.feed(&enc, |_| {
            pieces += 1;
            false
        }),
        Ok(())
    );
    assert_eq!(pieces, 1);
    assert!(d.produced() <= OUT_CHUNK as u64);
}

/// A 1 GiB body of zeros, compressed (about 1 MB for gzip), decoded under a 1 MiB cap.
#[test]
fn inflation_bombs_stop_at_the_cap_quickly() {
    const GIB: usize = 1 << 30;
    let zeros = vec![0u8; 1 << 20];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut zs = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    let mut bro = Vec::new();
    {
        let mut b = brotli::CompressorWriter::new(&mut bro, 4096, 5, 22);
        for _ in 0..GIB / zeros.len() {
            gz.write_all(&zeros).unwrap();
            zs.write_all(&zeros).unwrap();
            b.write_all(&zeros).unwrap();
        }
    }
    let bombs = [(Coding::Gzip, gz.finish().unwrap()), (Coding::Zstd, zs.finish().unwrap()), (Coding::Br, bro)];
    for (coding, bomb) in bombs {
        assert!(bomb.len() < 2 << 20, "{coding:?} bomb is {} bytes", bomb.len());
        let t = Instant::now();
        let mut d = Decoder::new(coding, 1 << 20);
        let mut seen = 0usize;
        let mut result = Ok(());
        for chunk in bomb.chunks(64 * 1024) {
            result = d.feed(chunk, |p| {
                seen += p.len();
                true
            });
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(DecodeError::TooLarge), "{coding:?}");
        assert!(seen <= 1 << 20, "{coding:?}: {seen}");
        assert!(t.elapsed() < Duration::from_secs(1), "{coding:?}: {:?}", t.elapsed());
    }
}

#[test]
fn windows_above_the_limit_are_refused_before_decoding() {
    let data = vec![7u8; 1000];
    // zstd: a frame declaring a 16 MiB window (not single-segment: streamed without a size).
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    e.window_log(24).unwrap();
    e.include_contentsize(false).unwrap();
    e.write_all(&data).unwrap();
    let big = e.finish().unwrap();
    assert_eq!(whole(Coding::Zstd, &big), Err(DecodeError::Window { coding: Coding::Zstd, size: 16 << 20 }));
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    e.window_log(23).unwrap();
    e.include_contentsize(false).unwrap();
    e.write_all(&data).unwrap();
    assert_eq!(whole(Coding::Zstd, &e.finish().unwrap()).as_deref(), Ok(&data[..]), "8 MiB is the limit, allowed");
    assert_eq!(MAX_WINDOW, 8 << 20);
    // brotli: lgwin 24 declares 16 MiB - 16; 23 and below pass.
    assert_eq!(whole(Coding::Br, &br(&data, 24)), Err(DecodeError::Window { coding: Coding::Br, size: (16 << 20) - 16 }));
    for lgwin in [10, 16, 17, 18, 22, 23] {
        assert_eq!(whole(Coding::Br, &br(&data, lgwin)).as_deref(), Ok(&data[..]), "lgwin {lgwin}");
    }
    let e = DecodeError::Window { coding: Coding::Zstd, size: 16 << 20 };
    assert_eq!((e.status(), e.code(), e.reason()), (415, "unsupported_content_encoding", "unsupported_encoding"));
    assert!(e.message(100).contains("16384 KiB"), "{}", e.message(100));
}

#[test]
fn content_encoding_headers() {
    let of = |values: &[&str]| Encoding::of(values.iter().map(|v| v.as_bytes()));
    assert_eq!(of(&[]), Encoding::Identity);
    assert_eq!(of(&["identity"]), Encoding::Identity);
    assert_eq!(of(&[""]), Encoding::Identity);
    assert_eq!(of(&["gzip"]), Encoding::Coded(Coding::Gzip));
    assert_eq!(of(&["GZip"]), Encoding::Coded(Coding::Gzip));
    assert_eq!(of(&["x-gzip"]), Encoding::Coded(Coding::Gzip));
    assert_eq!(of(&[" deflate "]), Encoding::Coded(Coding::Deflate));
    assert_eq!(of(&["br"]), Encoding::Coded(Coding::Br));
    assert_eq!(of(&["zstd"]), Encoding::Coded(Coding::Zstd));
    assert_eq!(of(&["identity, zstd"]), Encoding::Coded(Coding::Zstd));
    assert_eq!(of(&["gzip,"]), Encoding::Coded(Coding::Gzip));
    assert_eq!(of(&["compress"]), Encoding::Unsupported);
    assert_eq!(of(&["gzip, br"]), Encoding::Unsupported, "stacked");
    assert_eq!(of(&["gzip", "gzip"]), Encoding::Unsupported, "stacked over two headers");
    assert_eq!(of(&["br", "identity"]), Encoding::Coded(Coding::Br));
    assert_eq!(of(&["gzip;q=1"]), Encoding::Unsupported);
}
