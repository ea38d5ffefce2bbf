//! TCP ring buffer records ([`cprof::bpf::decode_tcp_event`]) and everything built from them
//! ([`TcpProfile`]: `tcp-events.jsonl`, `tcp-latency.json`, `tcp.pb.gz`, the summary rows).
//!
//! Input: records, each a length byte then that many bytes. A record decodes exactly when it
//! holds a whole `TcpEvent`, to the fields at their offsets (nothing read past the record:
//! AddressSanitizer watches); the outputs are valid JSON and pprof whose totals match the events.
#![no_main]

use std::mem::offset_of;

use cprof::bpf::{RawTcpEvent, comm_string, decode_tcp_event};
use cprof::symbols::Symbols;
use cprof::tcp::{TcpProfile, kind_name};
use libfuzzer_sys::fuzz_target;
use profiler_common::{TcpEvent, tcp_event};

fn u64_at(record: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(record[at..at + 8].try_into().unwrap())
}

fn u32_at(record: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(record[at..at + 4].try_into().unwrap())
}

fn records(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = data.split_first() {
        let (record, rest) = rest.split_at((len as usize).min(rest.len()));
        out.push(record);
        data = rest;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut raw = Vec::new();
    for record in records(data) {
        // A copy of exactly the record's bytes: AddressSanitizer flags any read past its end.
        let record = record.to_vec();
        let decoded = decode_tcp_event(&record);
        assert_eq!(decoded.is_some(), record.len() >= size_of::<TcpEvent>(), "{} bytes", record.len());
        let Some(event) = decoded else { continue };
        assert_eq!(event.time_ns, u64_at(&record, offset_of!(TcpEvent, time_ns)));
        assert_eq!(event.bytes_received, u64_at(&record, offset_of!(TcpEvent, bytes_received)));
        assert_eq!(event.kind, u32_at(&record, offset_of!(TcpEvent, kind)));
        assert_eq!(event.direction, u32_at(&record, offset_of!(TcpEvent, direction)));
        let comm = offset_of!(TcpEvent, comm);
        assert_eq!(event.comm[..], record[comm..comm + event.comm.len()]);
        let user = (event.user_stack_id >= 0).then(|| vec![event.time_ns, event.latency_ns]);
        raw.push(RawTcpEvent { comm: comm_string(&event.comm), user, event });
    }
    let events = raw.clone();
    let mut profile = TcpProfile::new();
    profile.add(raw);
    assert_eq!(profile.len(), events.len());

    let jsonl = profile.to_jsonl();
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), events.len(), "one line per event");
    for (line, e) in lines.iter().zip(&events) {
        assert_eq!(line["type"], kind_name(e.event.kind));
        assert_eq!(line["pid"], e.event.pid);
        assert_eq!(line["comm"], e.comm.as_str());
        let time = line["time"].as_str().expect("a time");
        assert!(time.len() >= 30 && time.ends_with('Z'), "{time}");
    }

    let count = |kinds: &[u32]| events.iter().filter(|e| kinds.contains(&e.event.kind)).count() as u64;
    let rows = profile.by_remote();
    let total = |f: fn(&cprof::tcp::RemoteStats) -> u64| rows.iter().map(|(_, s)| f(s)).sum::<u64>();
    assert_eq!(total(|s| s.connects), count(&[tcp_event::CONNECT]));
    assert_eq!(total(|s| s.failed), count(&[tcp_event::CONNECT_FAILED]));
    assert_eq!(total(|s| s.closes), count(&[tcp_event::CLOSE]));
    assert_eq!(total(|s| s.retransmits), count(&[tcp_event::RETRANSMIT]));
    for (remote, s) in &rows {
        if s.connects + s.failed > 0 {
            let (p50, p90, p99) = (s.latency(0.5), s.latency(0.9), s.latency(0.99));
            assert!(p50 <= p90 && p90 <= p99 && p99 <= s.max_ns, "{remote}: {p50} {p90} {p99} {}", s.max_ns);
        }
    }

    let latency: serde_json::Value =
        serde_json::from_str(&profile.to_latency_json(&serde_json::json!({}))).expect("valid JSON");
    let with_connects = rows.iter().filter(|(_, s)| s.connects + s.failed > 0).count();
    assert_eq!(latency["remotes"].as_array().map(Vec::len), Some(with_connects));

    let pprof = profile.to_pprof(&Symbols::default(), &["fuzz".to_owned()]);
    let sum = |i: usize| pprof.sample.iter().map(|s| i128::from(s.value[i])).sum::<i128>();
    let connects = count(&[tcp_event::CONNECT, tcp_event::CONNECT_FAILED]);
    let problems = count(&[tcp_event::RETRANSMIT, tcp_event::RESET_SENT, tcp_event::RESET_RECEIVED]);
    assert_eq!(sum(0), i128::from(connects));
    assert_eq!(sum(1), i128::from(problems));
    // Not gzipped: pprof_decode covers that, and a compressor per run would halve the speed.
    let decoded = cprof::pprof::decode(&prost::Message::encode_to_vec(&pprof)).expect("decodes");
    assert_eq!(decoded, pprof);
});
