//! Flag and config values: durations ([`cprof::config::parse_duration`]), sizes
//! ([`cprof::agent::config::parse_size`]) and event lists ([`cprof::config::parse_events`]).
//! What is accepted is in range and round-trips through the forms `--check-config` prints
//! ([`seconds_text`], `<n>B`, the event names) and through whole nanoseconds.
#![no_main]

use std::time::Duration;

use cprof::agent::config::parse_size;
use cprof::config::{parse_duration, parse_events, seconds_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration("fuzz", text) {
        assert!(d > Duration::ZERO, "{text:?} gave a zero duration");
        assert!(d <= Duration::from_secs(366 * 86_400), "{text:?} gave {d:?}");
        let printed = seconds_text(d);
        assert_eq!(parse_duration("fuzz", &printed).ok(), Some(d), "{text:?} printed as {printed}");
        let ns = format!("{}ns", d.as_nanos());
        assert_eq!(parse_duration("fuzz", &ns).ok(), Some(d), "{text:?} printed as {ns}");
    }
    if let Ok(bytes) = parse_size(text) {
        assert!(bytes >= 1, "{text:?}");
        let printed = format!("{bytes}B");
        assert_eq!(parse_size(&printed), Ok(bytes), "{text:?} printed as {printed}");
    }
    if let Ok(events) = parse_events(text) {
        let names = events.names().join(",");
        assert!(!names.is_empty(), "{text:?} selected no event");
        assert_eq!(parse_events(&names).ok(), Some(events), "{text:?} printed as {names}");
    }
});
