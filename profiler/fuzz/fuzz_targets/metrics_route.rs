//! Requests to the agent's metrics endpoint ([`cprof::agent::metrics::route`]), read from the
//! network: any bytes are routed, and only by the request line's method and path.
#![no_main]

use cprof::agent::metrics::{Route, route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let routed = route(data);
    let text = String::from_utf8_lossy(data);
    let mut words = text.split_whitespace();
    let method = words.next().unwrap_or("");
    let path = words.next().unwrap_or("").split('?').next().unwrap_or("");
    match routed {
        Route::Metrics { head } => {
            assert_eq!(path, "/metrics");
            assert_eq!(method, if head { "HEAD" } else { "GET" });
        }
        Route::Index => assert_eq!((method, path), ("GET", "/")),
        Route::NotFound => assert!(matches!(method, "GET" | "HEAD")),
        Route::NotAllowed => assert!(!matches!(method, "GET" | "HEAD")),
    }
    // What follows the request line's words never changes the route.
    let mut longer = data.to_vec();
    longer.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    if text.split_whitespace().count() >= 2 {
        assert_eq!(route(&longer), routed);
    }
});
