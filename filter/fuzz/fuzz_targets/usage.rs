#![no_main]
//! The usage reader on any bytes: no panic, the buffer within its bound, and the same answer
//! whatever the chunking (whole, cut in two, byte by byte), for both formats.
use filter::usage::{Format, Usage, UsageReader, MAX_USAGE_LEN};
use libfuzzer_sys::fuzz_target;

fn read(format: Format, chunks: &mut dyn Iterator<Item = &[u8]>) -> Option<Usage> {
    let mut r = UsageReader::new(format);
    for c in chunks {
        r.feed(c);
        assert!(r.buffered_bytes() <= MAX_USAGE_LEN);
    }
    let known = r.usage();
    let last = r.finish();
    // `usage()` before the end only lacks an SSE line without its newline.
    if format == Format::Json {
        assert_eq!(known, last);
    }
    last
}

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |&b| usize::from(b) * data.len() / 256);
    for format in [Format::Json, Format::Sse] {
        let whole = read(format, &mut std::iter::once(data));
        assert_eq!(read(format, &mut [&data[..cut], &data[cut..]].into_iter()), whole);
        assert_eq!(read(format, &mut data.chunks(1)), whole);
    }
});
