#![no_main]
use filter::body::{extract_model, BodyError};
use filter::body_scan::{scan, Scanner};
use libfuzzer_sys::fuzz_target;

fn kind(r: &Result<String, BodyError>) -> Option<std::mem::Discriminant<BodyError>> {
    r.as_ref().err().map(std::mem::discriminant)
}

fuzz_target!(|data: &[u8]| {
    let serde = extract_model(data);
    let _ = filter::models_index::parse_provider_list(data);

    // The streaming scanner, differential: any chunking gives the same verdict (message included).
    let whole = scan(data);
    let cut = data.first().map_or(0, |&b| usize::from(b) * data.len() / 256);
    let mut s = Scanner::new();
    let split = s.feed(&data[..cut]).and_then(|()| s.feed(&data[cut..])).and_then(|()| s.finish());
    assert_eq!(split, whole);
    let mut s = Scanner::new();
    let bytewise = data.iter().try_for_each(|b| s.feed(std::slice::from_ref(b))).and_then(|()| s.finish());
    assert_eq!(bytewise, whole);
    // What the scanner accepts serde accepts, with the same model.
    if let Ok(m) = &whole {
        assert_eq!(serde.as_ref(), Ok(m));
    }
    // Same kind of verdict as serde, except where they knowingly differ (see filter/src/body_scan.rs):
    // invalid UTF-8 in skipped strings (serde doesn't check), and a model value serde fails to build.
    let serde_build_failed =
        matches!(&serde, Err(BodyError::NotJson(m)) if m.starts_with("recursion limit exceeded") || m.starts_with("number out of range"));
    if std::str::from_utf8(data).is_ok() && !serde_build_failed {
        assert_eq!(kind(&whole), kind(&serde), "scanner {whole:?}, serde {serde:?}");
    }
});
