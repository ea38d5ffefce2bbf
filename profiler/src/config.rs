//! Validated settings, with units in their names. Everything that can be checked before the
//! kernel is touched is checked here, so bad input fails with one line and writes nothing.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::RecordArgs;

/// A flag's value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--pid {0}: no such process")]
    NoSuchPid(u32),
    #[error("--pid 0 is not a process (to profile every process, leave out --pid)")]
    PidZero,
    #[error("--frequency {0}: must be between 1 and 10000 Hz")]
    Frequency(u64),
    #[error("--{flag} {value:?}: {reason}")]
    Duration {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("--event {0:?}: unknown event (use a comma list of cpu, offcpu, syscall, tcp, all)")]
    UnknownEvent(String),
    #[error("--tcp-buffer-size {0}: must be a power of two between 4096 and 1073741824 bytes")]
    TcpBufferSize(u32),
    #[error("--{flag} {value}: must be between {min} and {max}")]
    MapSize {
        flag: &'static str,
        value: u32,
        min: u32,
        max: u32,
    },
}

/// How `cprof record` runs.
#[derive(Clone, Debug)]
pub struct RecordConfig {
    pub events: crate::bpf::Events,
    /// `None`: every process.
    pub pids: Option<Vec<u32>>,
    /// `None`: until a signal.
    pub duration: Option<Duration>,
    pub frequency_hz: u64,
    pub output_dir: PathBuf,
    pub drain_interval: Duration,
    pub off_cpu_min: Duration,
    pub off_cpu_threads: u32,
    pub syscall_slow: Duration,
    pub stack_map_size: u32,
    pub count_map_size: u32,
    /// Bytes of the TCP event ring buffer.
    pub tcp_buffer_size: u32,
    pub top: usize,
}

impl RecordConfig {
    /// Validates flags. `now_utc` names the default output directory.
    pub fn from_args(args: &RecordArgs, now_utc: &str) -> Result<Self, ConfigError> {
        let mut pids = args.pids.clone();
        pids.sort_unstable();
        pids.dedup();
        for &pid in &pids {
            if pid == 0 {
                return Err(ConfigError::PidZero);
            }
            if !crate::procfs::process_exists(pid) {
                return Err(ConfigError::NoSuchPid(pid));
            }
        }
        if !(1..=10_000).contains(&args.frequency) {
            return Err(ConfigError::Frequency(args.frequency));
        }
        let duration = args
            .duration
            .as_deref()
            .map(|d| parse_duration("duration", d))
            .transpose()?;
        let drain_interval = parse_duration("drain-interval", &args.drain_interval)?;
        let off_cpu_min = parse_duration("off-cpu-min", &args.off_cpu_min)?;
        let syscall_slow = parse_duration("syscall-slow", &args.syscall_slow)?;
        let events = parse_events(&args.events)?;
        for (flag, value) in [
            ("stack-map-size", args.stack_map_size),
            ("count-map-size", args.count_map_size),
            ("off-cpu-threads", args.off_cpu_threads),
        ] {
            let (min, max) = (16, 4 << 20);
            if !(min..=max).contains(&value) {
                return Err(ConfigError::MapSize {
                    flag,
                    value,
                    min,
                    max,
                });
            }
        }
        let tcp = args.tcp_buffer_size;
        if !tcp.is_power_of_two() || !(4_096..=1 << 30).contains(&tcp) {
            return Err(ConfigError::TcpBufferSize(tcp));
        }
        Ok(Self {
            events,
            pids: (!pids.is_empty()).then_some(pids),
            duration,
            frequency_hz: args.frequency,
            output_dir: args
                .output
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("cprof-{now_utc}"))),
            drain_interval,
            off_cpu_min,
            off_cpu_threads: args.off_cpu_threads,
            syscall_slow,
            stack_map_size: args.stack_map_size,
            count_map_size: args.count_map_size,
            tcp_buffer_size: args.tcp_buffer_size,
            top: args.top,
        })
    }

    /// Nanoseconds of CPU time one sample stands for.
    #[must_use]
    pub fn period_ns(&self) -> u64 {
        1_000_000_000 / self.frequency_hz
    }
}

/// Parses `cpu,offcpu`, `all`.
pub fn parse_events(list: &str) -> Result<crate::bpf::Events, ConfigError> {
    let mut events = crate::bpf::Events::default();
    for name in list.split(',').map(str::trim) {
        match name {
            "cpu" => events.cpu = true,
            "offcpu" => events.offcpu = true,
            "syscall" => events.syscall = true,
            "tcp" => events.tcp = true,
            "all" => {
                events.cpu = true;
                events.offcpu = true;
                events.syscall = true;
                events.tcp = true;
            }
            _ => return Err(ConfigError::UnknownEvent(name.into())),
        }
    }
    Ok(events)
}

/// Parses `10`, `10s`, `250ms`, `1.5s`, `5m`, `1h`, `1us`, `500ns` (a bare number is seconds).
/// Decimal digits are read exactly (no floating point), rounded to the nearest nanosecond:
/// whatever [`seconds_text`] prints reads back to the same duration.
pub fn parse_duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    /// A year: longer is refused. Leaves room in `u128` for every product below.
    const MAX_NS: u128 = 366 * 86_400 * 1_000_000_000;
    /// Fraction digits read; more cannot change the rounded nanoseconds of any unit.
    const MAX_FRACTION_DIGITS: u32 = 24;
    fn digits(text: &str) -> impl Iterator<Item = u128> + '_ {
        text.bytes().map(|b| u128::from(b - b'0'))
    }
    let err = |reason| ConfigError::Duration {
        flag,
        value: value.to_owned(),
        reason,
    };
    let s = value.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(err(
            "expected a number with an optional unit: ns, us, ms, s, m, h",
        ));
    }
    let unit_ns: u128 = match unit.trim() {
        "" | "s" => 1_000_000_000,
        "ms" => 1_000_000,
        "us" | "µs" => 1_000,
        "ns" => 1,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(err("unknown unit (use ns, us, ms, s, m or h)")),
    };
    let mut whole_ns: u128 = 0;
    for d in digits(whole) {
        whole_ns = whole_ns * 10 + d * unit_ns;
        if whole_ns > MAX_NS {
            return Err(err("must be at most a year"));
        }
    }
    let fraction = &fraction[..fraction.len().min(MAX_FRACTION_DIGITS as usize)];
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction_ns = digits(fraction).fold(0, |n, d| n * 10 + d) * unit_ns;
    let ns = whole_ns + (fraction_ns + scale / 2) / scale;
    if ns == 0 {
        let exact_zero = whole_ns == 0 && fraction_ns == 0;
        return Err(err(if exact_zero {
            "must be greater than zero"
        } else {
            "must be at least 1ns"
        }));
    }
    if ns > MAX_NS {
        return Err(err("must be at most a year"));
    }
    Ok(Duration::from_nanos(ns as u64))
}

/// A duration as exact decimal seconds, the way `--check-config` prints it: `60s`, `0.000001s`.
/// [`parse_duration`] reads it back to the same duration.
#[must_use]
pub fn seconds_text(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos == 0 {
        return format!("{secs}s");
    }
    let fraction = format!("{nanos:09}");
    format!("{secs}.{}s", fraction.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<RecordConfig, ConfigError> {
        let mut argv = vec!["cprof", "record"];
        argv.extend_from_slice(args);
        let Command::Record(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("expected the record command");
        };
        RecordConfig::from_args(&args, "20261123T000000Z")
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.pids, None);
        assert_eq!(c.duration, None);
        assert_eq!(c.frequency_hz, 99);
        assert_eq!(c.output_dir, PathBuf::from("cprof-20261123T000000Z"));
        assert_eq!(c.period_ns(), 10_101_010);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("d", "10").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("d", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("d", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("d", "2m").unwrap(), Duration::from_mins(2));
        assert_eq!(parse_duration("d", "1h").unwrap(), Duration::from_hours(1));
        assert_eq!(
            parse_duration("d", "1.5us").unwrap(),
            Duration::from_nanos(1500)
        );
        assert_eq!(
            parse_duration("d", ".5").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("d", "2.").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_duration("d", "0.6ns").unwrap(),
            Duration::from_nanos(1)
        );
        assert_eq!(
            parse_duration("d", "366d").unwrap_err().to_string(),
            "--d \"366d\": unknown unit (use ns, us, ms, s, m or h)"
        );
        for bad in [
            "",
            "0",
            "-1",
            "abc",
            "10 parsecs",
            "1e400",
            ".",
            "1.2.3",
            "0.000",
            "8785h",
        ] {
            assert!(
                parse_duration("d", bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        assert!(parse_duration("d", "8784h").is_ok(), "a leap year");
        assert!(parse_duration("d", &"9".repeat(60)).is_err());
    }

    #[test]
    fn durations_found_by_fuzzing() {
        // Was accepted as a zero duration (0.2 ns through f64 seconds).
        assert_eq!(
            parse_duration("d", ".2ns").unwrap_err().to_string(),
            "--d \".2ns\": must be at least 1ns"
        );
        // Printed and read back through f64 seconds, this came back 1 ns short.
        let d = Duration::new(31_622_399, 999_999_999);
        assert_eq!(seconds_text(d), "31622399.999999999s");
        assert_eq!(parse_duration("d", &seconds_text(d)).unwrap(), d);
        assert_eq!(seconds_text(Duration::from_mins(1)), "60s");
        assert_eq!(seconds_text(Duration::from_micros(1)), "0.000001s");
    }

    #[test]
    fn refuses_bad_values_with_the_flag_named() {
        let msg = |args: &[&str]| parse(args).unwrap_err().to_string();
        assert_eq!(
            msg(&["--frequency", "0"]),
            "--frequency 0: must be between 1 and 10000 Hz"
        );
        assert_eq!(msg(&["--pid", "0"]).split(' ').next(), Some("--pid"));
        assert_eq!(msg(&["--pid", "4000000"]), "--pid 4000000: no such process");
        assert!(msg(&["--duration", "soon"]).starts_with("--duration \"soon\""));
        assert!(msg(&["--stack-map-size", "1"]).starts_with("--stack-map-size 1"));
    }

    #[test]
    fn events() {
        let e = |list| parse_events(list).map(|e| (e.cpu, e.offcpu, e.syscall));
        assert_eq!(e("cpu").unwrap(), (true, false, false));
        assert_eq!(e("offcpu").unwrap(), (false, true, false));
        assert_eq!(e("cpu,offcpu").unwrap(), (true, true, false));
        assert_eq!(e("syscall").unwrap(), (false, false, true));
        assert_eq!(e("all").unwrap(), (true, true, true));
        assert!(parse_events("tcp").unwrap().tcp && parse_events("all").unwrap().tcp);
        assert_eq!(
            parse_events("cpu,disk").unwrap_err().to_string(),
            "--event \"disk\": unknown event (use a comma list of cpu, offcpu, syscall, tcp, all)"
        );
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.off_cpu_min,
            Duration::from_micros(1),
            "default --off-cpu-min"
        );
        assert!(c.events.cpu && !c.events.offcpu, "default --event cpu");
    }

    #[test]
    fn pids_are_deduplicated() {
        let me = std::process::id().to_string();
        let c = parse(&["--pid", &me, "--pid", &me]).unwrap();
        assert_eq!(c.pids, Some(vec![std::process::id()]));
    }
}
