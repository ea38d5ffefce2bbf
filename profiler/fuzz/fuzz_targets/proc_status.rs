//! Lines of `/proc/<pid>/status` and `/proc/<pid>/stat`: the `CapEff:` mask
//! ([`cprof::privilege::parse_cap_eff`]) round-trips through the kernel's format, and the state
//! letter of a stat line ([`cprof::procfs::parse_stat_state`]) is found whatever the comm holds.
#![no_main]

use cprof::privilege::{RECORD_REQUIRED, RECORD_WANTED, missing, parse_cap_eff};
use cprof::procfs::parse_stat_state;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(mask) = parse_cap_eff(text) {
        let status = format!("Name:\tcprof\nCapPrm:\t{mask:016x}\nCapEff:\t{mask:016x}\n");
        assert_eq!(parse_cap_eff(&status), Some(mask));
        assert!(missing(mask, &RECORD_REQUIRED).len() <= RECORD_REQUIRED.len());
        assert!(missing(mask, &RECORD_WANTED).len() <= RECORD_WANTED.len());
    }

    if let Some(state) = parse_stat_state(text) {
        let (_, rest) = text.rsplit_once(") ").expect("a state follows \") \"");
        assert!(rest.starts_with(state));
    }
    // The kernel writes the comm as is: parentheses, spaces and ") " included.
    let comm: String = text.chars().take(64).collect();
    for state in ['R', 'S', 'Z'] {
        let stat = format!("4242 ({comm}) {state} 1 4242 4242 0 -1 4194560 110 0 0 0");
        assert_eq!(parse_stat_state(&stat), Some(state), "{stat:?}");
    }
});
