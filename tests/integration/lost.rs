//! Conservation under loss: with in-kernel maps and buffers deliberately too small, samples and
//! events are lost, and every one is accounted for by reason. What the kernel saw equals what
//! reached the output plus what was dropped, exactly, in the summary, the pprof comments and the
//! agent's metrics.

use std::path::Path;
use std::time::Duration;

use cprof::pprof::{Profile, ProfileExt as _};

use crate::agent::{Agent, scrape};
use crate::util::{
    PausedWorkload, Recording, comment, number_after, out_dir, read_named_profile, read_profile,
    require_root,
};

/// Sum of the first value (the sample count) over every sample.
fn received(p: &Profile) -> u64 {
    p.sample.iter().map(|s| s.value[0] as u64).sum()
}

/// Samples whose stack was lost whole: the `[stack not captured]` placeholder.
fn with_lost_stack(p: &Profile) -> u64 {
    p.sample
        .iter()
        .filter(|s| p.stack_names(s).contains(&"[stack not captured]"))
        .map(|s| s.value[0] as u64)
        .sum()
}

/// 24 busy threads, each walking 32 stack depths, at 999 Hz into maps of 16 entries.
#[test]
fn oncpu_samples_add_up_when_the_maps_are_too_small() {
    require_root();
    let mut w = PausedWorkload::start("hotthreads", &["24", "3"]);
    let dir = out_dir("lost-oncpu");
    let pid = w.pid().to_string();
    let rec = Recording::start(
        &[
            "--pid",
            &pid,
            "-F",
            "999",
            "--count-map-size",
            "16",
            "--stack-map-size",
            "16",
        ],
        &dir,
    );
    w.go();
    w.finish();
    let summary = rec.wait(Duration::from_secs(20));
    let p = read_profile(&dir);
    let line = comment(&p, "samples: ");
    let seen = number_after(line, "seen ");
    let recorded = number_after(line, "recorded ");
    let lost = number_after(line, "lost ");
    let filtered = number_after(line, "filtered ");
    let idle = number_after(line, "idle ");
    let stacks = comment(&p, "stacks lost: ");
    let stacks_lost = number_after(stacks, "user ")
        + number_after(stacks, "full, ")
        + number_after(stacks, "kernel ")
        + number_after(&stacks[stacks.find("kernel").unwrap()..], "full, ");
    let got = received(&p);
    let placeholder = with_lost_stack(&p);
    eprintln!(
        "lost on-CPU: seen {seen} = recorded {recorded} + lost {lost} + filtered {filtered} + idle {idle}; \
         received {got}; stacks lost {stacks_lost}, samples with [lost stack] {placeholder}"
    );
    assert_eq!(
        seen,
        recorded + lost + filtered + idle,
        "every tick is accounted for: {line}"
    );
    assert!(
        recorded + lost > 1_000,
        "24 threads busy for 3 s at 999 Hz (6000 ticks on two idle CPUs): {line}"
    );
    assert!(
        lost > 0,
        "16 entries cannot hold 24 threads' samples: {line}"
    );
    assert_eq!(got, recorded, "every recorded sample reaches the pprof");
    assert!(stacks_lost > 0, "16 stacks cannot hold 32 depths: {stacks}");
    assert!(
        placeholder > 0,
        "samples whose stack was lost are kept as [stack not captured]"
    );
    // The summary says the same.
    assert_eq!(number_after(&summary, "On-CPU: "), recorded, "{summary}");
    assert_eq!(number_after(&summary, "Lost samples: "), lost, "{summary}");
    assert_eq!(
        number_after(&summary, "lost stacks: "),
        stacks_lost,
        "{summary}"
    );
    assert_eq!(number_after(&summary, "ticks seen: "), seen, "{summary}");
}

/// Events in `tcp-events.jsonl`.
fn jsonl_events(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("tcp-events.jsonl"))
        .expect("tcp-events.jsonl")
        .lines()
        .count() as u64
}

/// `tcp loopback 3000 0 0` recorded with a ring buffer of `bytes`: (sent, lost, in the file,
/// summary).
fn tcp_run(buffer_bytes: &str, test: &str) -> (u64, u64, u64, String) {
    let mut w = PausedWorkload::start("tcp", &["loopback", "3000", "0", "0"]);
    let dir = out_dir(test);
    let rec = Recording::start(
        &[
            "--pid",
            &w.pid().to_string(),
            "--event",
            "tcp",
            "--tcp-buffer-size",
            buffer_bytes,
        ],
        &dir,
    );
    w.go();
    w.finish();
    let summary = rec.wait(Duration::from_secs(20));
    let p = read_named_profile(&dir, "tcp.pb.gz");
    let line = comment(&p, "TCP events:");
    let sent = number_after(line, "sent ");
    let lost = number_after(line, "lost ");
    assert_eq!(number_after(&summary, "TCP: "), sent, "{summary}");
    assert_eq!(number_after(&summary, "Lost: "), lost, "{summary}");
    (sent, lost, jsonl_events(&dir), summary)
}

/// 3000 loopback connections: through the default ring buffer every event arrives; through one
/// page, most are lost, and sent + lost is the same total.
#[test]
fn tcp_events_add_up_when_the_ring_buffer_is_too_small() {
    require_root();
    let (sent_full, lost_full, file_full, _) = tcp_run("4194304", "lost-tcp-full");
    let (sent, lost, file, summary) = tcp_run("4096", "lost-tcp-small");
    eprintln!(
        "lost TCP: 4 MiB ring: sent {sent_full}, lost {lost_full}, in the file {file_full}; \
         4 KiB ring: sent {sent}, lost {lost}, in the file {file}"
    );
    assert_eq!(lost_full, 0, "4 MiB holds a 3000-connection burst");
    assert!(
        sent_full.abs_diff(12_000) <= 360,
        "four events per connection: {sent_full} of 12000"
    );
    assert_eq!(file_full, sent_full, "every event sent reaches the file");
    assert!(lost > 0, "one page cannot hold the burst:\n{summary}");
    // 3000 connections make 12000 events (connect, accept, two closes), but the last state
    // changes of its sockets can come after the recording has stopped (it ends at the first
    // drain after the target exited), and a full ring can add the odd event (seen: 12002):
    // allow 3% either way.
    assert!(
        (sent + lost).abs_diff(12_000) <= 360,
        "the same workload, the same number of events: {sent} + {lost} of 12000"
    );
    assert_eq!(file, sent, "every event sent reaches the file");
}

/// The value of `series` in a Prometheus exposition.
fn metric(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// On-CPU stacks lost, every reason, from the agent's metrics.
fn lost_oncpu_stacks(body: &str) -> u64 {
    [
        "user_stack_map_full",
        "user_stack_collision",
        "kernel_stack_map_full",
        "kernel_stack_collision",
    ]
    .iter()
    .map(|r| metric(body, &format!("cprof_lost_stacks_total{{reason=\"{r}\"}}")))
    .sum()
}

/// `cprof: window <stamp>: 1 files, <N> samples (lost <L>)` -> (N, L).
fn window_counts(line: &str) -> (u64, u64) {
    (number_after(line, "files, "), number_after(line, "(lost "))
}

/// (window files, samples in them) of the agent's `cpu-*.pb.gz` in `dir`.
fn cpu_windows(dir: &Path) -> (usize, u64) {
    let (mut files, mut samples) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("cpu-") && name.ends_with(".pb.gz") {
            let bytes = std::fs::read(&path).unwrap();
            samples += received(&cprof::pprof::decode(&bytes).unwrap());
            files += 1;
        }
    }
    (files, samples)
}

/// The agent's metrics carry the same accounting, and its windows hold every recorded sample.
#[test]
fn agent_metrics_count_lost_samples_by_reason() {
    require_root();
    let port = 19_471;
    let dir = out_dir("lost-agent");
    let mut w = PausedWorkload::start("hotthreads", &["12", "5"]);
    let pid = w.pid().to_string();
    let mut agent = Agent::start(&[
        "--pid",
        &pid,
        "-F",
        "999",
        "--count-map-size",
        "16",
        "--stack-map-size",
        "16",
        "--interval",
        "1s",
        "--output-dir",
        dir.to_str().unwrap(),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    w.go();
    // The metrics are refreshed at every drain: keep the last scrape taken while the workload
    // ran (the agent stops once it has exited).
    let mut body = String::new();
    while w.child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(250));
        // The workload may end between the check and the scrape, and the agent with it.
        let Ok(now) = std::panic::catch_unwind(|| scrape(port)) else {
            break;
        };
        if !now.contains("cprof_samples_total 0\n") {
            body = now;
        }
    }
    assert!(!body.is_empty(), "no drain within the workload's run");
    w.finish();
    // With --pid, the agent stops once its target has exited, after writing the last window.
    agent.wait_for_line("cprof: agent stopped", Duration::from_secs(15));
    let c = |name: &str| {
        metric(
            &body,
            &format!("cprof_probe_events_total{{counter=\"{name}\"}}"),
        )
    };
    let (seen, idle, filtered, recorded, dropped) = (
        c("samples_seen"),
        c("samples_idle"),
        c("samples_filtered"),
        c("samples_recorded"),
        c("dropped_counts_full"),
    );
    let by_reason = metric(
        &body,
        "cprof_lost_samples_total{reason=\"oncpu_count_map_full\"}",
    );
    let stacks = lost_oncpu_stacks(&body);
    // What each window says it holds, and what its file holds.
    let (mut said, mut said_lost) = (0, 0);
    for line in agent
        .lines
        .iter()
        .filter(|l| l.starts_with("cprof: window "))
    {
        let (n, lost) = window_counts(line);
        said += n;
        said_lost += lost;
    }
    let (files, in_files) = cpu_windows(&dir);
    eprintln!(
        "lost agent: seen {seen} = recorded {recorded} + dropped {dropped} + filtered {filtered} + idle {idle} \
         (mid-run scrape); lost_samples_total {by_reason}; lost stacks {stacks}; \
         {files} windows say {said} samples (lost {said_lost}), their files hold {in_files}"
    );
    // The counters are read one after another while the programs run: allow the ticks of a
    // few milliseconds between the first read and the last.
    let accounted = recorded + dropped + filtered + idle;
    assert!(
        seen.abs_diff(accounted) <= 20,
        "seen {seen} vs accounted {accounted}"
    );
    assert!(dropped > 0, "16 entries cannot hold 24 threads' samples");
    assert_eq!(
        by_reason, dropped,
        "the by-reason series is the same counter"
    );
    assert!(stacks > 0, "16 stacks cannot hold 32 depths");
    assert_eq!(metric(&body, "cprof_samples_total"), recorded);
    assert_eq!(in_files, said, "every window's file holds what it reported");
    assert!(
        said >= recorded && said_lost >= dropped,
        "the windows hold at least what was recorded by the time of the scrape"
    );
    assert_eq!(
        files,
        agent
            .lines
            .iter()
            .filter(|l| l.starts_with("cprof: window "))
            .count(),
        "one file per window: no window replaced another"
    );
}
