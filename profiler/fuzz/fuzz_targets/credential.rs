//! Push credential files ([`credential_header`]): an accepted file gives an `Authorization`
//! value without control characters (no header can be smuggled in), a basic one encodes the
//! file's `user:password` line, a bearer one its token; a refused file gets one of the three
//! reasons the error message is made of.
#![no_main]

use base64::Engine as _;
use cprof::fuzzing::{CredentialKind, credential_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for kind in [CredentialKind::Basic, CredentialKind::Bearer] {
        match credential_header(kind, text) {
            Ok(header) => {
                assert!(!header.chars().any(char::is_control), "{header:?}");
                let line = text.strip_suffix('\n').unwrap_or(text);
                let line = line.strip_suffix('\r').unwrap_or(line);
                match kind {
                    CredentialKind::Basic => {
                        let encoded = header.strip_prefix("Basic ").expect("a basic header");
                        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
                        assert_eq!(decoded, line.as_bytes());
                        assert!(line.contains(':'));
                    }
                    CredentialKind::Bearer => {
                        let token = header.strip_prefix("Bearer ").expect("a bearer header");
                        assert!(!token.is_empty() && token == token.trim() && token == line.trim());
                    }
                }
            }
            Err(reason) => assert!(
                [
                    "is empty",
                    "must hold one line without control characters",
                    "must hold user:password"
                ]
                .contains(&reason),
                "{reason}"
            ),
        }
    }
});
