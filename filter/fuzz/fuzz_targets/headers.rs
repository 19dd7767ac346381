#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = filter::auth::check(Some(data), "sk-master-key");
    let _ = filter::endpoints::classify("POST", &text);
    let _ = filter::endpoints::label(&text);
});
