//! TCP events against workloads whose connections are known.

use std::time::Duration;

use cprof::pprof::ProfileExt as _;

use crate::util::{self, PausedWorkload, Recording};

fn events(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("tcp-events.jsonl"))
        .expect("tcp-events.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn of_type<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// What a `tcp loopback`/`loopback6` run produced.
struct LoopbackRun {
    pid: u32,
    port: u64,
    closed_port: u64,
    refused: u64,
    events: Vec<serde_json::Value>,
    summary: String,
}

/// Runs the workload in `mode` (`loopback` or `loopback6`) under `cprof record --event tcp`.
fn loopback_run(mode: &str, n: u64, bytes: u64, m: u64, dir: &std::path::Path) -> LoopbackRun {
    let mut w = PausedWorkload::start(
        "tcp",
        &[mode, &n.to_string(), &bytes.to_string(), &m.to_string()],
    );
    let pid = w.pid();
    let rec = Recording::start(&["--pid", &pid.to_string(), "--event", "tcp"], dir);
    w.go();
    let out = w.finish();
    let summary = rec.wait(Duration::from_secs(15));
    LoopbackRun {
        pid,
        port: util::measured(&out, "port"),
        closed_port: util::measured(&out, "closed_port"),
        refused: util::measured(&out, "refused"),
        events: events(dir),
        summary,
    }
}

/// N connects to a listener and M to a closed port, on loopback.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one recording, every property of its output"
)]
fn loopback_connects_closes_and_refusals() {
    util::require_root();
    let (n, bytes, m) = (20u64, 10_000u64, 5u64);
    let dir = util::out_dir("tcp-loopback");
    let run = loopback_run("loopback", n, bytes, m, &dir);
    let (pid, port, closed, summary) = (run.pid, run.port, run.closed_port, run.summary);
    assert_eq!(
        run.refused, m,
        "every connect to the closed port was refused"
    );

    let all = run.events;
    for e in &all {
        assert_eq!(e["pid"], pid, "only the target's connections: {e}");
        assert_eq!(e["comm"], "tcp");
    }
    let connects: Vec<_> = of_type(&all, "connect")
        .into_iter()
        .filter(|e| e["dport"] == port)
        .collect();
    assert_eq!(connects.len() as u64, n, "one connect event per connection");
    assert!(
        connects
            .iter()
            .all(|e| e["latency_ns"].as_u64().unwrap() > 0 && e["daddr"] == "127.0.0.1")
    );
    let client_closes: Vec<_> = of_type(&all, "close")
        .into_iter()
        .filter(|e| e["dport"] == port)
        .collect();
    assert_eq!(
        client_closes.len() as u64,
        n,
        "one close per client connection"
    );
    for c in &client_closes {
        assert!(c["lifetime_ns"].as_u64().unwrap() > 0, "{c}");
        assert_eq!(c["bytes_sent"], bytes, "the bytes the workload sent: {c}");
    }
    let accepts: Vec<_> = of_type(&all, "accept")
        .into_iter()
        .filter(|e| e["sport"] == port)
        .collect();
    assert_eq!(
        accepts.len() as u64,
        n,
        "the server's accepts, attributed to the listener's process"
    );
    let server_closes: Vec<_> = of_type(&all, "close")
        .into_iter()
        .filter(|e| e["sport"] == port)
        .collect();
    assert_eq!(server_closes.len() as u64, n);
    assert!(
        server_closes.iter().all(|c| c["bytes_received"] == bytes),
        "the server received every byte"
    );
    let failed: Vec<_> = of_type(&all, "connect_failed")
        .into_iter()
        .filter(|e| e["dport"] == closed)
        .collect();
    assert_eq!(failed.len() as u64, m, "refused connects");
    let resets = of_type(&all, "reset_received")
        .into_iter()
        .filter(|e| e["dport"] == closed)
        .count();
    assert_eq!(resets as u64, m, "each refusal is a reset received");
    eprintln!(
        "tcp loopback: {} connects (p50 {} ns), {} client closes of {bytes} bytes, {} accepts, {} failed, {resets} resets",
        connects.len(),
        {
            let mut l: Vec<u64> = connects
                .iter()
                .map(|e| e["latency_ns"].as_u64().unwrap())
                .collect();
            l.sort_unstable();
            l[l.len() / 2]
        },
        client_closes.len(),
        accepts.len(),
        failed.len()
    );

    // Latency per remote, and the stacks that connected.
    let latency: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tcp-latency.json")).unwrap())
            .unwrap();
    let remote = format!("127.0.0.1:{port}");
    let row = latency["remotes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["remote"] == remote.as_str())
        .unwrap();
    assert_eq!(row["connects"], n);
    let p = util::read_named_profile(&dir, "tcp.pb.gz");
    let from_open: i64 = p
        .sample
        .iter()
        .filter(|s| {
            p.label_str(s, "remote") == Some(remote.as_str())
                && util::on_stack(&p, s, "open_connection")
        })
        .map(|s| s.value[0])
        .sum();
    assert_eq!(
        from_open, n as i64,
        "connects attributed to open_connection"
    );
    assert!(summary.contains(&remote), "{summary}");
}

/// The same over IPv6: addresses read from the socket's IPv6 fields.
#[test]
fn ipv6_connections() {
    util::require_root();
    let (n, bytes, m) = (5u64, 1_000u64, 2u64);
    let dir = util::out_dir("tcp-ipv6");
    let run = loopback_run("loopback6", n, bytes, m, &dir);
    let (port, closed) = (run.port, run.closed_port);
    let all = run.events;
    let connects: Vec<_> = of_type(&all, "connect")
        .into_iter()
        .filter(|e| e["dport"] == port)
        .collect();
    assert_eq!(connects.len() as u64, n, "{all:?}");
    assert!(
        connects
            .iter()
            .all(|e| e["daddr"] == "::1" && e["saddr"] == "::1"),
        "{connects:?}"
    );
    let closes: Vec<_> = of_type(&all, "close")
        .into_iter()
        .filter(|e| e["dport"] == port)
        .collect();
    assert_eq!(closes.len() as u64, n);
    assert!(
        closes
            .iter()
            .all(|c| c["bytes_sent"] == bytes && c["daddr"] == "::1")
    );
    let failed = of_type(&all, "connect_failed")
        .into_iter()
        .filter(|e| e["dport"] == closed)
        .count();
    assert_eq!(failed as u64, m);
    eprintln!(
        "tcp ipv6: {} connects and {} closes to [::1]:{port}, {failed} refused",
        connects.len(),
        closes.len()
    );
}

/// A loop of thousands of connects per second: every event arrives, or the loss is counted.
#[test]
fn connect_bursts_lose_nothing_silently() {
    util::require_root();
    let mut w = PausedWorkload::start("tcp", &["burst", "2"]);
    let dir = util::out_dir("tcp-burst");
    let rec = Recording::start(&["--pid", &w.pid().to_string(), "--event", "tcp"], &dir);
    w.go();
    let connects = util::measured(&w.finish(), "connects");
    rec.wait(Duration::from_secs(15));
    let all = events(&dir);
    let seen = of_type(&all, "connect").len() as u64;
    let p = util::read_named_profile(&dir, "tcp.pb.gz");
    let line = util::comment(&p, "TCP events:");
    let lost = util::number_after(line, "lost ");
    eprintln!("tcp burst: {connects} connects in 2 s, {seen} connect events, {lost} events lost");
    assert!(connects > 1000, "a burst: {connects}");
    if lost == 0 {
        assert_eq!(
            seen, connects,
            "no loss reported, so every connect is there"
        );
    } else {
        assert!(
            seen + lost >= connects,
            "{seen} seen + {lost} lost < {connects}"
        );
    }
}

/// Two network namespaces joined by a veth pair, made and removed by the test.
struct TestNet {
    name: String,
}

impl TestNet {
    const CLIENT_ADDR: &'static str = "10.254.7.1";
    const SERVER_ADDR: &'static str = "10.254.7.2";

    fn new() -> Self {
        let name = format!("cprof{}", std::process::id());
        let net = Self { name };
        let (a, b) = (net.ns("a"), net.ns("b"));
        let (va, vb) = (format!("{}va", net.name), format!("{}vb", net.name));
        for args in [
            vec!["netns", "add", &a],
            vec!["netns", "add", &b],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", &a],
            vec!["link", "set", &vb, "netns", &b],
            vec!["-n", &a, "addr", "add", "10.254.7.1/30", "dev", &va],
            vec!["-n", &b, "addr", "add", "10.254.7.2/30", "dev", &vb],
            vec!["-n", &a, "link", "set", &va, "up"],
            vec!["-n", &b, "link", "set", &vb, "up"],
            vec!["-n", &a, "link", "set", "lo", "up"],
            vec!["-n", &b, "link", "set", "lo", "up"],
        ] {
            run("ip", &args);
        }
        net
    }

    fn ns(&self, side: &str) -> String {
        format!("{}{side}", self.name)
    }

    /// A command run inside namespace `side`.
    fn exec(&self, side: &str, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(side)]).arg(program);
        cmd
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for side in ["a", "b"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(side)])
                .status();
        }
    }
}

use std::process::Command;

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running {program} (install iproute2 and nftables): {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// A server that drops a quarter of the data packets it receives (nftables; this kernel has no
/// netem): the client retransmits, and cprof attributes the retransmits to it.
#[test]
fn retransmits_are_attributed_to_the_sender() {
    util::require_root();
    let net = TestNet::new();
    let ns_b = net.ns("b");
    run(
        "ip",
        &[
            "netns", "exec", &ns_b, "nft", "add", "table", "inet", "cprof",
        ],
    );
    run(
        "ip",
        &[
            "netns",
            "exec",
            &ns_b,
            "nft",
            "add",
            "chain",
            "inet",
            "cprof",
            "input",
            "{ type filter hook input priority 0; }",
        ],
    );
    run(
        "ip",
        &[
            "netns",
            "exec",
            &ns_b,
            "nft",
            "add",
            "rule",
            "inet",
            "cprof",
            "input",
            "tcp",
            "dport",
            "9000",
            "tcp flags & syn == 0",
            "numgen",
            "random",
            "mod",
            "4",
            "==",
            "0",
            "drop",
        ],
    );
    let binary = util::workload_binary("tcp");
    let mut server = net.exec("b", &binary);
    server
        .args(["server", TestNet::SERVER_ADDR, "9000"])
        .stdout(std::process::Stdio::piped());
    let server = server.spawn().expect("starting the server");
    std::thread::sleep(Duration::from_millis(300));
    let mut client = net.exec("a", &binary);
    client.args(["client", TestNet::SERVER_ADDR, "9000", "200000"]);
    let mut w = PausedWorkload::start_command(client);
    let pid = w.pid();
    let dir = util::out_dir("tcp-retransmit");
    let rec = Recording::start(&["--pid", &pid.to_string(), "--event", "tcp"], &dir);
    w.go();
    assert_eq!(util::measured(&w.finish(), "sent"), 200_000);
    let received = server.wait_with_output().unwrap();
    assert_eq!(
        util::measured(&String::from_utf8_lossy(&received.stdout), "received"),
        200_000
    );
    rec.wait(Duration::from_secs(15));
    let all = events(&dir);
    let retransmits: Vec<_> = of_type(&all, "retransmit");
    eprintln!(
        "tcp retransmits: {} retransmit events for a connection to {} that lost a quarter of its data packets",
        retransmits.len(),
        TestNet::SERVER_ADDR
    );
    assert!(
        !retransmits.is_empty(),
        "a quarter of the packets dropped must cause retransmits"
    );
    for r in &retransmits {
        assert_eq!(r["pid"], pid, "attributed to the sending process: {r}");
        assert_eq!(r["daddr"], TestNet::SERVER_ADDR);
        assert_eq!(r["dport"], 9000);
        assert_eq!(r["saddr"], TestNet::CLIENT_ADDR);
    }
    let close = of_type(&all, "close");
    assert_eq!(close.len(), 1, "{all:?}");
    assert_eq!(
        close[0]["bytes_sent"], 200_000,
        "every byte made it, retransmitted or not"
    );
    let latency: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tcp-latency.json")).unwrap())
            .unwrap();
    assert_eq!(latency["remotes"][0]["retransmits"], retransmits.len());
}
