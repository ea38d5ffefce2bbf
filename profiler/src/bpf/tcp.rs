//! The TCP probes: BTF tracepoints on the TCP state machine, retransmits and resets; events read
//! from a ring buffer at each drain.

use aya::Ebpf;
use aya::maps::{MapData, RingBuf, StackTraceMap};
use profiler_common::{TcpEvent, TcpOffsets, maps as m};

use super::{BpfError, comm_string, take_map};

const PROGRAMS: [(&str, &str); 4] = [
    ("on_inet_sock_set_state", "inet_sock_set_state"),
    ("on_tcp_retransmit_skb", "tcp_retransmit_skb"),
    ("on_tcp_send_reset", "tcp_send_reset"),
    ("on_tcp_receive_reset", "tcp_receive_reset"),
];

/// One TCP event as drained, addresses still raw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawTcpEvent {
    pub event: TcpEvent,
    pub comm: String,
    /// The user stack of the code that opened the connection.
    pub user: Option<Vec<u64>>,
}

/// One ring buffer record as a [`TcpEvent`]; `None` when it is shorter than one (the programs
/// write whole events only). Bytes past the event are ignored.
#[must_use]
pub fn decode_tcp_event(record: &[u8]) -> Option<TcpEvent> {
    if record.len() < size_of::<TcpEvent>() {
        return None;
    }
    // SAFETY: `record` holds at least `size_of::<TcpEvent>()` bytes and every bit pattern is a
    // valid `TcpEvent` (integers and byte arrays only, `aya::Pod`). Read unaligned: nothing
    // promises the record's alignment.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) })
}

/// Where the socket fields are on this kernel.
pub fn offsets(btf: &crate::btf::Btf) -> Result<TcpOffsets, BpfError> {
    // `struct sock` starts with its `struct sock_common`, `struct tcp_sock` with a `struct sock`.
    let common = |field| btf.field_offset("sock_common", field);
    Ok(TcpOffsets {
        daddr: common("skc_daddr")?,
        rcv_saddr: common("skc_rcv_saddr")?,
        dport: common("skc_dport")?,
        num: common("skc_num")?,
        family: common("skc_family")?,
        v6_daddr: common("skc_v6_daddr")?,
        v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        bytes_acked: btf.field_offset("tcp_sock", "bytes_acked")?,
        bytes_received: btf.field_offset("tcp_sock", "bytes_received")?,
        pad: 0,
    })
}

pub(super) struct Tcp {
    events: RingBuf<MapData>,
    stacks: StackTraceMap<MapData>,
    /// Stack ids are never reused while the map is not cleared: read each one once.
    stack_cache: super::StackCache,
}

impl Tcp {
    pub(super) fn attach(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        let tcp = Self {
            events: take_map(ebpf, m::TCP_EVENTS)?,
            stacks: take_map(ebpf, m::TCP_STACKS)?,
            stack_cache: super::StackCache::default(),
        };
        super::attach_btf_tracepoints(ebpf, &PROGRAMS)?;
        Ok(tcp)
    }

    /// Everything the ring buffer holds now.
    pub(super) fn drain(&mut self) -> Vec<RawTcpEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            events.extend(decode_tcp_event(&item));
        }
        events
            .into_iter()
            .map(|event| RawTcpEvent {
                comm: comm_string(&event.comm),
                user: self.stack(event.user_stack_id),
                event,
            })
            .collect()
    }

    fn stack(&mut self, id: i32) -> Option<Vec<u64>> {
        self.stack_cache.get(&self.stacks, id)
    }
}
