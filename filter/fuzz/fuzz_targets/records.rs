#![no_main]
use filter::fail2ban::BanRecord;
use filter::rate_window::RateRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = RateRecord::decode(Some(data));
    r.prune(1_000);
    let _ = r.try_admit(1_000, filter::config::Rpm::Limit(5), Some(("m", filter::config::Rpm::Limit(2))));
    assert_eq!(RateRecord::decode(Some(&r.encode())), r);
    let b = BanRecord::decode(Some(data));
    assert_eq!(BanRecord::decode(Some(&b.encode())), b);
});
