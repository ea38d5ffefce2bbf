//! File names cprof reads back from its own directories: push spool files
//! (`<seq>-<job>.push`, [`parse_spool_file_name`], [`valid_job_name`]) and window files
//! (`<signal>-<YYYYMMDDTHHMMSSZ>.<ext>`, [`window_stamp`]). A spool file's name round-trips and
//! leaves a next sequence number; a valid job name is one plain path component; a window stamp
//! is 16 characters of the name.
#![no_main]

use cprof::agent::retention::window_stamp;
use cprof::fuzzing::{parse_spool_file_name, valid_job_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(seq) = parse_spool_file_name(name) {
        assert!(seq.checked_add(1).is_some(), "{name:?}: no sequence number after {seq}");
        let job = name.strip_suffix(".push").and_then(|s| s.split_once('-')).map(|(_, j)| j);
        let job = job.expect("a spool name has a job name");
        assert!(valid_job_name(job), "{job:?}");
        let written = format!("{seq:010}-{job}.push");
        assert_eq!(parse_spool_file_name(&written), Some(seq), "{written}");
    }
    if valid_job_name(name) {
        assert!(!name.contains(['/', '\0']) && name != "." && name != "..", "{name:?}");
        assert!(name.len() <= 200);
        assert_eq!(parse_spool_file_name(&format!("0000000007-{name}.push")), Some(7));
    }
    if let Some(stamp) = window_stamp(name) {
        assert_eq!(stamp.len(), 16);
        assert!(name.contains(stamp) && !name.starts_with('.'));
        assert!(stamp.bytes().all(|b| b.is_ascii_digit() || b == b'T' || b == b'Z'), "{stamp}");
    }
});
