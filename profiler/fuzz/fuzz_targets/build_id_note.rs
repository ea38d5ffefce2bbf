//! ELF notes as in `/sys/kernel/notes` ([`cprof::procfs::parse_build_id_note`]): any bytes give a
//! lowercase hex id or nothing, and a well-formed `NT_GNU_BUILD_ID` note is found whatever
//! notes come after it, and after well-formed notes of other kinds.
#![no_main]

use cprof::procfs::parse_build_id_note;
use libfuzzer_sys::fuzz_target;

fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    for part in [name, desc] {
        out.extend_from_slice(part);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fuzz_target!(|data: &[u8]| {
    if let Some(id) = parse_build_id_note(data) {
        assert!(id.len() % 2 == 0 && id.len() <= data.len() * 2, "{id}");
        assert!(id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{id}");
    }
    let desc = &data[..data.len().min(20)];
    let mut notes = note(b"Xen\0", 3, b"not this one");
    notes.extend(note(b"Linux\0", 1, &data[desc.len()..]));
    notes.extend(note(b"GNU\0", 3, desc));
    notes.extend_from_slice(data);
    assert_eq!(parse_build_id_note(&notes), Some(hex(desc)));
});
