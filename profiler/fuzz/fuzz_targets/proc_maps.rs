//! `/proc/<pid>/maps` text ([`cprof::procfs::parse_maps`]): every entry is a mapping with
//! `start <= end` that renders back to a line parsing to itself, and
//! [`ProcessInfo::mapping_of`] finds each executable mapping by its first and last address.
//! (Where a mapped file is opened, inside the target's root, is `target_file`'s business:
//! `openat2` refuses an escape, whatever the path says.)
#![no_main]

use cprof::procfs::{MapEntry, ProcessInfo, parse_maps};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let maps = parse_maps(text);
    assert!(maps.len() <= text.lines().count(), "at most one entry per line");
    for m in &maps {
        assert!(m.start <= m.end, "a mapping ends before it starts: {m:?}");
        let perms = if m.executable { "r-xp" } else { "r--p" };
        // glibc's `makedev` layout of 32-bit major and minor numbers (`gnu_dev_major/minor`).
        let (major, minor) = (
            ((m.dev >> 8) & 0xfff) | ((m.dev >> 32) & 0xffff_f000),
            (m.dev & 0xff) | ((m.dev >> 12) & 0xffff_ff00),
        );
        let line = format!(
            "{:x}-{:x} {perms} {:08x} {major:x}:{minor:x} {} {}",
            m.start, m.end, m.offset, m.inode, m.path
        );
        assert_eq!(parse_maps(&line), [m.clone()], "rendered as {line:?}");
        if m.is_deleted() {
            assert!(m.path.ends_with(" (deleted)"));
        }
    }

    let mut mappings: Vec<MapEntry> = maps.into_iter().filter(|m| m.executable).collect();
    mappings.sort_by_key(|m| m.start);
    let disjoint = mappings.windows(2).all(|w| w[0].end <= w[1].start);
    let info = ProcessInfo {
        mappings,
        ..ProcessInfo::default()
    };
    for m in &info.mappings {
        if disjoint && m.start < m.end {
            assert_eq!(info.mapping_of(m.start), Some(m), "first address");
            assert_eq!(info.mapping_of(m.end - 1), Some(m), "last address");
        }
        if disjoint {
            assert!(info.mapping_of(m.end).is_none_or(|n| n.start == m.end));
        }
    }
});
