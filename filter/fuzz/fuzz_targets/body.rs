#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = filter::body::extract_model(data);
    let _ = filter::models_index::parse_provider_list(data);
});
