#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let env = |name: &str| (name == "SET").then(|| "value".to_string());
        let _ = filter::config::load(text, &env);
        let _ = filter::config::parse_models_yaml(text);
    }
});
