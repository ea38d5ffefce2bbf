//! pprof files, gzipped or not ([`cprof::pprof::decode`]), and the split of a profile by its
//! `process` label that the pusher sends per service ([`cprof::pprof::split_by_label`]): the
//! parts hold every sample once, under its own label value, with the locations, functions and
//! mappings they use, and encode and decode back to themselves.
#![no_main]

use std::collections::HashSet;

use cprof::pprof::{ProfileExt as _, decode, encode_gzip, split_by_label};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(profile) = decode(data) else {
        return;
    };
    assert_eq!(decode(&encode_gzip(&profile)).ok().as_ref(), Some(&profile), "re-encoding changed it");

    let parts = split_by_label(&profile, "process");
    let samples: usize = parts.iter().map(|(_, p)| p.sample.len()).sum();
    assert_eq!(samples, profile.sample.len(), "every sample in one part");
    let values: HashSet<&str> = parts.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(values.len(), parts.len(), "one part per value");
    let known: HashSet<u64> = profile.location.iter().map(|l| l.id).collect();
    for (value, part) in &parts {
        assert!(!part.sample.is_empty(), "part {value:?} is empty");
        let ids: HashSet<u64> = part.location.iter().map(|l| l.id).collect();
        for sample in &part.sample {
            assert_eq!(part.label_str(sample, "process").unwrap_or(""), value);
            for id in &sample.location_id {
                assert!(!known.contains(id) || ids.contains(id), "location {id} left out of {value:?}");
            }
        }
        assert_eq!(part.string_table, profile.string_table);
        assert_eq!(decode(&encode_gzip(part)).ok().as_ref(), Some(part));
    }
});
