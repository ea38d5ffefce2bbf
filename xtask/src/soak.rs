//! `cargo xtask soak`: `cprof agent` with every signal, system-wide, for a long run while a churn
//! workload starts and ends hundreds of processes a second. Every 10 s it records the agent's
//! RSS, open file descriptors, the symbol cache sizes, its BPF links and the entries of its BPF
//! maps (from `/proc/<pid>/fdinfo` and `bpftool map dump`), and writes target/bench/soak.md:
//! memory, descriptors and map entries must plateau, not grow with the processes seen.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

const PORT: u16 = 19_469;

struct Point {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    processes: f64,
    user_addresses: f64,
    windows: f64,
    unreadable: f64,
    links: usize,
    /// Entries of every map, and of the maps keyed by thread.
    map_entries: usize,
    syscall_start: usize,
    offcpu_start: usize,
    offcpu_stacks: usize,
}

/// (links, entries per map name) of the BPF objects `pid` holds.
fn bpf_objects(pid: u32) -> (usize, std::collections::BTreeMap<String, usize>) {
    let mut links = 0;
    let mut entries = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, entries);
    };
    let bpftool = |args: &[&str]| -> serde_json::Value {
        Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if field("link_id:").is_some() {
            links += 1;
        }
        let Some(id) = field("map_id:") else {
            continue;
        };
        let show = bpftool(&["map", "show", "id", id]);
        let name = show["name"].as_str().unwrap_or("?").to_owned();
        let dump = bpftool(&["map", "dump", "id", id]);
        *entries.entry(name).or_default() += dump.as_array().map_or(0, Vec::len);
    }
    (links, entries)
}

pub fn run(root: &Path, cprof: &Path, minutes: f64, rate: u32) -> anyhow::Result<()> {
    let churn = crate::setup::workload(root, "churn")?;
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let dir = out.join("soak-windows");
    let _ = std::fs::remove_dir_all(&dir);
    let total = Duration::from_secs_f64(minutes * 60.0);
    let mut agent = Command::new(cprof)
        .args([
            "agent",
            "--event",
            "all",
            "--interval",
            "30s",
            "--retain-size",
            "200MiB",
        ])
        .arg("--output-dir")
        .arg(&dir)
        .args(["--metrics-addr", &format!("127.0.0.1:{PORT}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting cprof agent")?;
    std::thread::sleep(Duration::from_secs(3));
    let mut load = Command::new(&churn)
        .args([rate.to_string(), total.as_secs().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the churn workload")?;
    let started = Instant::now();
    let mut points = Vec::new();
    while started.elapsed() < total {
        std::thread::sleep(Duration::from_secs(10));
        if let Some(status) = agent.try_wait()? {
            bail!("cprof agent exited during the soak: {status}");
        }
        let metrics = scrape().unwrap_or_default();
        let m = |name: &str| metric(&metrics, name);
        let (links, entries) = bpf_objects(agent.id());
        let of = |name: &str| entries.get(name).copied().unwrap_or(0);
        let point = Point {
            links,
            map_entries: entries.values().sum(),
            syscall_start: of("SYSCALL_START"),
            offcpu_start: of("OFFCPU_START"),
            offcpu_stacks: of("OFFCPU_STACKS"),
            at: started.elapsed(),
            rss_kib: rss_kib(agent.id()),
            fds: std::fs::read_dir(format!("/proc/{}/fd", agent.id())).map_or(0, Iterator::count),
            processes: m("cprof_symbol_cache_entries{cache=\"processes\"}"),
            user_addresses: m("cprof_symbol_cache_entries{cache=\"user_addresses\"}"),
            windows: m("cprof_windows_written_total"),
            unreadable: m("cprof_processes_unreadable_total"),
        };
        eprintln!(
            "soak: {:>5.0} s  rss {:>7} KiB  fds {:>4}  processes cached {:>6}  windows {}  links {}  map entries {}",
            point.at.as_secs_f64(),
            point.rss_kib,
            point.fds,
            point.processes,
            point.windows,
            point.links,
            point.map_entries
        );
        points.push(point);
    }
    let mut printed = String::new();
    load.stdout.take().unwrap().read_to_string(&mut printed)?;
    load.wait()?;
    Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()?;
    let stopped = Instant::now();
    let status = agent.wait()?;
    let report = report(
        &points,
        printed.trim(),
        rate,
        minutes,
        stopped.elapsed(),
        status.success(),
    );
    std::fs::write(out.join("soak.md"), &report)?;
    println!("{report}");
    Ok(())
}

fn report(
    points: &[Point],
    churn: &str,
    rate: u32,
    minutes: f64,
    stop: Duration,
    clean_exit: bool,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Soak: cprof agent --event all, system-wide, {minutes} min, churn {rate} processes/s ({churn})\n"
    );
    let _ = writeln!(
        md,
        "| time | RSS (KiB) | fds | processes cached | user addresses cached | windows | processes unreadable | BPF links | BPF map entries | SYSCALL_START | OFFCPU_START | OFFCPU_STACKS |"
    );
    let _ = writeln!(
        md,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for p in points {
        let _ = writeln!(
            md,
            "| {:.0} s | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.at.as_secs_f64(),
            p.rss_kib,
            p.fds,
            p.processes,
            p.user_addresses,
            p.windows,
            p.unreadable,
            p.links,
            p.map_entries,
            p.syscall_start,
            p.offcpu_start,
            p.offcpu_stacks
        );
    }
    if let (Some(first), Some(last)) = (points.iter().find(|p| p.at.as_secs() >= 60), points.last())
    {
        let max = points.iter().map(|p| p.rss_kib).max().unwrap_or(0);
        let _ = writeln!(
            md,
            "\nRSS after the first minute {} KiB, at the end {} KiB (x{:.2}), peak {} KiB; fds {} -> {}; BPF links {} -> {}; BPF map entries {} -> {} (SYSCALL_START {} -> {}, OFFCPU_START {} -> {}, OFFCPU_STACKS {} -> {}).",
            first.rss_kib,
            last.rss_kib,
            last.rss_kib as f64 / first.rss_kib.max(1) as f64,
            max,
            first.fds,
            last.fds,
            first.links,
            last.links,
            first.map_entries,
            last.map_entries,
            first.syscall_start,
            last.syscall_start,
            first.offcpu_start,
            last.offcpu_start,
            first.offcpu_stacks,
            last.offcpu_stacks
        );
    }
    let _ = writeln!(
        md,
        "SIGTERM at the end: exit {} after {:.2} s.",
        if clean_exit { "0" } else { "non-zero" },
        stop.as_secs_f64()
    );
    md
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn scrape() -> std::io::Result<String> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", PORT))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    Ok(body)
}

fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(f64::NAN)
}
