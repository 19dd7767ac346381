#![no_main]
use filter::attempt::Plan;
use filter::fail2ban::BanRecord;
use filter::rate_window::RateRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Whatever decodes survives a charge and round-trips; a corrupt record is None (reset by the caller).
    if let Some(mut r) = RateRecord::decode(data) {
        r.prune(1_000);
        let _ = r.try_admit(1_000, filter::config::Rpm::Limit(5), Some(("m", filter::config::Rpm::Limit(2))));
        r.charge_tokens(1_000, 60, true, Some("m"));
        assert_eq!(RateRecord::decode(&r.encode()), Some(r.clone()));
        assert!(r.encoded_len() <= filter::rate_window::MAX_RECORD_BYTES + 8 * 2, "bounded");
    }
    if let Some(b) = BanRecord::decode(data) {
        assert_eq!(BanRecord::decode(&b.encode()), Some(b));
    }
    if let Some(p) = Plan::decode(data) {
        assert_eq!(Plan::decode(&p.encode()), Some(p));
    }
});
