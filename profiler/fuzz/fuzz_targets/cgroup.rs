//! `/proc/<pid>/cgroup` text ([`cprof::container::ContainerIdentity::parse`]): the cgroup is a
//! path of the text, a container id is 64 lowercase hex digits taken from it, a pod UID 36
//! characters of hex and dashes, and the cgroup parses back to itself as a cgroup v2 line.
#![no_main]

use cprof::container::ContainerIdentity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = ContainerIdentity::parse(text);
    assert!(text.contains(&c.cgroup), "{:?} is not in the file", c.cgroup);
    if let Some(id) = &c.container_id {
        assert!(id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert!(text.to_ascii_lowercase().contains(id.as_str()));
    }
    if let Some(uid) = &c.pod_uid {
        assert!(uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
        assert!(text.contains("kubepods"));
    }
    let v2 = ContainerIdentity::parse(&format!("0::{}", c.cgroup));
    assert_eq!(v2.cgroup, c.cgroup);
    // The chosen cgroup is searched first, then the other v1 paths.
    if v2.container_id.is_some() {
        assert_eq!(v2.container_id, c.container_id);
    }
    if v2.pod_uid.is_some() {
        assert_eq!(v2.pod_uid, c.pod_uid);
    }
});
