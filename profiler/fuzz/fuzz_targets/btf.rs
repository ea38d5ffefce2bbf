//! BTF blobs as in `/sys/kernel/btf/vmlinux` ([`cprof::btf::Btf`]): any bytes parse or give an
//! error, and looking a field up never fails other than with `NoStruct`/`NoField`, for the
//! fields cprof reads and for names taken from the blob itself.
#![no_main]

use cprof::btf::{Btf, BtfError};
use libfuzzer_sys::fuzz_target;

/// What `bpf::tcp::offsets` and the off-CPU programs look up.
const WANTED: &[(&str, &str)] = &[
    ("sock_common", "skc_daddr"),
    ("sock_common", "skc_v6_daddr"),
    ("sock_common", "skc_num"),
    ("tcp_sock", "bytes_acked"),
    ("tcp_sock", "bytes_received"),
    ("task_struct", "pid"),
    ("task_struct", "tgid"),
];

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    // Names in the blob: NUL-terminated runs of identifier characters.
    let names: Vec<&str> = data
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty() && s.len() <= 64)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .filter(|s| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .take(12)
        .collect();
    let derived = names.iter().flat_map(|&s| names.iter().map(move |&f| (s, f)));
    for (strukt, field) in WANTED.iter().copied().chain(derived) {
        match btf.field_offset(strukt, field) {
            Ok(_) => {}
            Err(BtfError::NoStruct(s)) => assert_eq!(s, strukt),
            Err(BtfError::NoField { strukt: s, field: f }) => assert_eq!((s.as_str(), f.as_str()), (strukt, field)),
            Err(e) => panic!("a lookup failed with {e}"),
        }
    }
});
