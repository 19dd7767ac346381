#![no_main]
//! The body decoder on any bytes, in every coding: no panic, the cap held, the pieces bounded, and
//! the same verdict (the bytes, or the kind of error) whatever the chunking.
use filter::content_encoding::{Coding, DecodeError, Decoder, OUT_CHUNK};
use libfuzzer_sys::fuzz_target;

const CAP: u64 = 1 << 20;

fn decode(coding: Coding, chunks: &mut dyn Iterator<Item = &[u8]>) -> Result<Vec<u8>, std::mem::Discriminant<DecodeError>> {
    let mut d = Decoder::new(coding, CAP);
    let mut out = Vec::new();
    for c in chunks {
        let r = d.feed(c, |piece| {
            assert!(!piece.is_empty() && piece.len() <= OUT_CHUNK);
            out.extend_from_slice(piece);
            true
        });
        assert!(out.len() as u64 <= CAP);
        r.map_err(|e| std::mem::discriminant(&e))?;
    }
    d.finish().map_err(|e| std::mem::discriminant(&e))?;
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |&b| usize::from(b) * data.len() / 256);
    for coding in [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd] {
        let whole = decode(coding, &mut std::iter::once(data));
        assert_eq!(decode(coding, &mut [&data[..cut], &data[cut..]].into_iter()), whole, "{coding:?}");
        assert_eq!(decode(coding, &mut data.chunks(1)), whole, "{coding:?}");
    }
});
