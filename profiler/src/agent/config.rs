//! `cprof agent` settings: command-line flags over a TOML file over built-in defaults, validated
//! before anything is attached, so that a bad deployment fails at once with one line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::AgentArgs;
use crate::config::{ConfigError, RecordConfig, parse_duration, parse_events, seconds_text};
use crate::push::PushSettings;
use profiler_common::maps as m;

/// The agent's settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Probe settings; `pids` is the fixed target list, `output_dir` the window directory.
    pub record: RecordConfig,
    /// cgroup v2 directories whose subtrees are profiled.
    pub cgroups: Vec<PathBuf>,
    pub interval: Duration,
    pub retain_age: Duration,
    pub retain_bytes: u64,
    /// `None`: no metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    pub push: Option<PushSettings>,
    /// `service_name` of pushed profiles; `None`: each process's comm.
    pub service_name: Option<String>,
    /// `--pid-namespace self`: record our pid namespace's tasks, with its pids.
    pub own_pid_namespace: bool,
}

/// The config file: the flags' names without dashes, every key optional. Its values are checked
/// by [`AgentConfig::from_args`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pid: Option<Vec<u32>>,
    cgroup: Option<Vec<PathBuf>>,
    event: Option<String>,
    pid_namespace: Option<String>,
    interval: Option<String>,
    output_dir: Option<PathBuf>,
    retain_age: Option<String>,
    retain_size: Option<String>,
    frequency: Option<u64>,
    metrics_addr: Option<String>,
    push_pyroscope: Option<String>,
    push_basic_auth_file: Option<PathBuf>,
    push_bearer_token_file: Option<PathBuf>,
    push_tenant: Option<String>,
    service_name: Option<String>,
    stack_map_size: Option<u32>,
    count_map_size: Option<u32>,
    off_cpu_min: Option<String>,
    off_cpu_threads: Option<u32>,
    syscall_slow: Option<String>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("--config {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error(transparent)]
    Value(#[from] ConfigError),
    #[error("--{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(
    flag: &'static str,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> AgentConfigError {
    AgentConfigError::Invalid {
        flag,
        value: value.into(),
        reason: reason.into(),
    }
}

impl AgentConfig {
    /// Merges the command line over the config file (if any) over the defaults, and validates.
    #[expect(
        clippy::too_many_lines,
        reason = "one flag after another, each merged and checked in the same few lines"
    )]
    pub fn from_args(args: &AgentArgs) -> Result<Self, AgentConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let pick_vec = |cli: &Vec<u32>, file: &Option<Vec<u32>>| {
            if cli.is_empty() {
                file.clone().unwrap_or_default()
            } else {
                cli.clone()
            }
        };
        let pids = pick_vec(&args.pids, &file.pid);
        let cgroups = if args.cgroups.is_empty() {
            file.cgroup.clone().unwrap_or_default()
        } else {
            args.cgroups.clone()
        };
        let text = |cli: &Option<String>, file: &Option<String>, default: &str| {
            cli.clone()
                .or_else(|| file.clone())
                .unwrap_or_else(|| default.to_owned())
        };
        let events = parse_events(&text(&args.events, &file.event, "cpu"))?;
        let frequency_hz = args.frequency.or(file.frequency).unwrap_or(99);
        if !(1..=10_000).contains(&frequency_hz) {
            return Err(ConfigError::Frequency(frequency_hz).into());
        }
        let interval = parse_duration("interval", &text(&args.interval, &file.interval, "60s"))?;
        if interval < Duration::from_secs(1) {
            return Err(invalid(
                "interval",
                format!("{interval:?}"),
                "must be at least 1s",
            ));
        }
        let drain_interval = match &args.drain_interval {
            Some(d) => parse_duration("drain-interval", d)?,
            None => Duration::from_secs(1).min(interval),
        };
        let retain_age = parse_duration(
            "retain-age",
            &text(&args.retain_age, &file.retain_age, "24h"),
        )?;
        let size_text = text(&args.retain_size, &file.retain_size, "1GiB");
        let retain_bytes = parse_size(&size_text)
            .map_err(|reason| invalid("retain-size", size_text.clone(), reason))?;
        let metrics_text = text(&args.metrics_addr, &file.metrics_addr, "127.0.0.1:9464");
        let metrics_addr = if metrics_text == "off" {
            None
        } else {
            Some(metrics_text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics-addr",
                    metrics_text.clone(),
                    "expected IP:PORT (127.0.0.1:9464, [::1]:9464, 0.0.0.0:9464) or off",
                )
            })?)
        };
        let push = match args.push_pyroscope.clone().or(file.push_pyroscope.clone()) {
            None => None,
            Some(url) => Some(push_settings(args, &file, url)?),
        };
        let map_size = |flag: &'static str, cli: Option<u32>, file: Option<u32>, default: u32| {
            let value = cli.or(file).unwrap_or(default);
            let (min, max) = (16, 4 << 20);
            if (min..=max).contains(&value) {
                Ok(value)
            } else {
                Err(ConfigError::MapSize {
                    flag,
                    value,
                    min,
                    max,
                })
            }
        };
        let record = RecordConfig {
            events,
            pids: None,
            duration: None,
            frequency_hz,
            output_dir: args
                .output_dir
                .clone()
                .or(file.output_dir.clone())
                .unwrap_or_else(|| PathBuf::from("/var/lib/cprof")),
            drain_interval,
            off_cpu_min: parse_duration(
                "off-cpu-min",
                &text(&args.off_cpu_min, &file.off_cpu_min, "1us"),
            )?,
            off_cpu_threads: map_size(
                "off-cpu-threads",
                args.off_cpu_threads,
                file.off_cpu_threads,
                m::OFFCPU_START_MAX_ENTRIES,
            )?,
            syscall_slow: parse_duration(
                "syscall-slow",
                &text(&args.syscall_slow, &file.syscall_slow, "1ms"),
            )?,
            stack_map_size: map_size(
                "stack-map-size",
                args.stack_map_size,
                file.stack_map_size,
                m::STACKS_MAX_ENTRIES,
            )?,
            count_map_size: map_size(
                "count-map-size",
                args.count_map_size,
                file.count_map_size,
                m::COUNTS_MAX_ENTRIES,
            )?,
            tcp_buffer_size: m::TCP_EVENTS_BYTES,
            top: 10,
        };
        let mut pids = pids;
        pids.sort_unstable();
        pids.dedup();
        for &pid in &pids {
            if pid == 0 {
                return Err(ConfigError::PidZero.into());
            }
            if !crate::procfs::process_exists(pid) {
                return Err(ConfigError::NoSuchPid(pid).into());
            }
        }
        let cgroups = cgroups
            .iter()
            .map(|c| resolve_cgroup(c))
            .collect::<Result<Vec<_>, _>>()?;
        let own_pid_namespace =
            match text(&args.pid_namespace, &file.pid_namespace, "host").as_str() {
                "host" => false,
                "self" => true,
                other => return Err(invalid("pid-namespace", other, "expected host or self")),
            };
        let service_name = args.service_name.clone().or(file.service_name.clone());
        if let Some(name) = &service_name
            && (name.is_empty() || name.chars().any(char::is_control))
        {
            return Err(invalid(
                "service-name",
                name.clone(),
                "must be a non-empty printable name",
            ));
        }
        Ok(Self {
            record: RecordConfig {
                pids: (!pids.is_empty()).then_some(pids),
                ..record
            },
            cgroups,
            interval,
            retain_age,
            retain_bytes,
            metrics_addr,
            push,
            service_name,
            own_pid_namespace,
        })
    }

    /// The settings in effect, as `cprof agent --check-config` prints them (TOML).
    #[must_use]
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let r = &self.record;
        let events = r.events.names();
        let mut out = String::new();
        let quote = toml_string;
        let _ = writeln!(out, "event = {}", quote(&events.join(",")));
        if let Some(pids) = &r.pids {
            let _ = writeln!(out, "pid = {pids:?}");
        }
        if !self.cgroups.is_empty() {
            let list: Vec<String> = self
                .cgroups
                .iter()
                .map(|c| quote(&c.display().to_string()))
                .collect();
            let _ = writeln!(out, "cgroup = [{}]", list.join(", "));
        }
        if self.own_pid_namespace {
            let _ = writeln!(out, "pid-namespace = \"self\"");
        }
        if r.pids.is_none() && self.cgroups.is_empty() && !self.own_pid_namespace {
            let _ = writeln!(out, "# targets: every process");
        }
        let _ = writeln!(out, "interval = \"{}\"", seconds_text(self.interval));
        let _ = writeln!(
            out,
            "output-dir = {}",
            quote(&r.output_dir.display().to_string())
        );
        let _ = writeln!(out, "retain-age = \"{}\"", seconds_text(self.retain_age));
        let _ = writeln!(out, "retain-size = \"{}B\"", self.retain_bytes);
        let _ = writeln!(out, "frequency = {}", r.frequency_hz);
        let _ = writeln!(
            out,
            "metrics-addr = {}",
            quote(
                &self
                    .metrics_addr
                    .map_or_else(|| "off".to_owned(), |a| a.to_string())
            )
        );
        if let Some(push) = &self.push {
            let _ = writeln!(out, "push-pyroscope = {}", quote(&push.url));
            if let Some(f) = &push.basic_auth_file {
                let _ = writeln!(
                    out,
                    "push-basic-auth-file = {}",
                    quote(&f.display().to_string())
                );
            }
            if let Some(f) = &push.bearer_token_file {
                let _ = writeln!(
                    out,
                    "push-bearer-token-file = {}",
                    quote(&f.display().to_string())
                );
            }
            if let Some(t) = &push.tenant {
                let _ = writeln!(out, "push-tenant = {}", quote(t));
            }
        }
        if let Some(name) = &self.service_name {
            let _ = writeln!(out, "service-name = {}", quote(name));
        }
        let _ = writeln!(out, "stack-map-size = {}", r.stack_map_size);
        let _ = writeln!(out, "count-map-size = {}", r.count_map_size);
        let _ = writeln!(out, "off-cpu-min = \"{}\"", seconds_text(r.off_cpu_min));
        let _ = writeln!(out, "off-cpu-threads = {}", r.off_cpu_threads);
        let _ = writeln!(out, "syscall-slow = \"{}\"", seconds_text(r.syscall_slow));
        out
    }
}

/// `s` as a TOML basic string. Not Rust's `{:?}`: its `\u{ad}` escapes are not TOML.
fn toml_string(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn read_file(path: &Path) -> Result<FileConfig, AgentConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text).map_err(|message| AgentConfigError::ParseFile {
        path: path.to_owned(),
        message,
    })
}

/// Parses the TOML text of a config file; the error is one line, `line <n>: <message>` where
/// the TOML parser names a place.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| {
        // Some of the parser's messages span lines ("invalid string\nexpected ..."): joined.
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {message}")
            }
            None => message,
        }
    })
}

fn push_settings(
    args: &AgentArgs,
    file: &FileConfig,
    url: String,
) -> Result<PushSettings, AgentConfigError> {
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if !scheme_ok || url.len() <= "https://".len() {
        return Err(invalid(
            "push-pyroscope",
            url,
            "expected an http:// or https:// URL",
        ));
    }
    let readable =
        |flag: &'static str, path: Option<PathBuf>| -> Result<Option<PathBuf>, AgentConfigError> {
            if let Some(p) = &path {
                std::fs::File::open(p)
                    .map_err(|e| invalid(flag, p.display().to_string(), e.to_string()))?;
            }
            Ok(path)
        };
    let basic_auth_file = readable(
        "push-basic-auth-file",
        args.push_basic_auth_file
            .clone()
            .or(file.push_basic_auth_file.clone()),
    )?;
    let bearer_token_file = readable(
        "push-bearer-token-file",
        args.push_bearer_token_file
            .clone()
            .or(file.push_bearer_token_file.clone()),
    )?;
    if basic_auth_file.is_some() && bearer_token_file.is_some() {
        return Err(invalid(
            "push-bearer-token-file",
            "",
            "use either basic auth or a bearer token, not both",
        ));
    }
    Ok(PushSettings {
        url: url.trim_end_matches('/').to_owned(),
        basic_auth_file,
        bearer_token_file,
        tenant: args.push_tenant.clone().or(file.push_tenant.clone()),
    })
}

/// Parses `1GiB`, `500MiB`, `10MB`, `4096` (bytes).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let s = value.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        "expected a number with an optional unit: B, KiB, MiB, GiB, KB, MB, GB".to_owned()
    })?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" | "K" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        "TiB" | "T" => 1024f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => {
            return Err(format!(
                "unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    let bytes = number * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err("must be at least 1 byte".to_owned());
    }
    Ok(bytes as u64)
}

/// The cgroup2 mount point, from `/proc/self/mountinfo` (`/sys/fs/cgroup` on most systems,
/// `/sys/fs/cgroup/unified` on hybrid ones).
#[must_use]
pub fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split(' ').next()?;
        let mount_point = before.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// `path` as an existing directory of the cgroup2 hierarchy.
fn resolve_cgroup(path: &Path) -> Result<PathBuf, AgentConfigError> {
    let shown = path.display().to_string();
    let root = cgroup2_root()
        .ok_or_else(|| invalid("cgroup", shown.clone(), "no cgroup2 filesystem is mounted"))?;
    let full = if path.is_absolute() {
        path.to_owned()
    } else {
        root.join(path)
    };
    let full = full
        .canonicalize()
        .map_err(|e| invalid("cgroup", shown.clone(), e.to_string()))?;
    if !full.starts_with(&root) || !full.join("cgroup.procs").exists() {
        return Err(invalid(
            "cgroup",
            shown,
            format!("not a cgroup v2 directory (under {})", root.display()),
        ));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

    fn args(argv: &[&str]) -> AgentArgs {
        let mut full = vec!["cprof", "agent"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Agent(a) => *a,
            Command::Record(_) => unreachable!(),
        }
    }

    #[test]
    fn defaults() {
        let c = AgentConfig::from_args(&args(&[])).unwrap();
        assert_eq!(c.interval, Duration::from_mins(1));
        assert_eq!(c.retain_age, Duration::from_hours(24));
        assert_eq!(c.retain_bytes, 1 << 30);
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.record.output_dir, PathBuf::from("/var/lib/cprof"));
        assert!(c.record.events.cpu && !c.record.events.syscall);
        assert!(c.record.pids.is_none() && c.cgroups.is_empty() && c.push.is_none());
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("cprof-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "interval = \"2s\"\nevent = \"cpu,syscall\"\nretain-size = \"10MiB\"\nmetrics-addr = \"off\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = AgentConfig::from_args(&args(&["--config", f])).unwrap();
        assert_eq!(c.interval, Duration::from_secs(2));
        assert!(c.record.events.syscall);
        assert_eq!(c.retain_bytes, 10 << 20);
        assert_eq!(c.metrics_addr, None);
        let c = AgentConfig::from_args(&args(&["--config", f, "--interval", "5s"])).unwrap();
        assert_eq!(c.interval, Duration::from_secs(5), "the flag wins");

        std::fs::write(&file, "interval = \"2s\"\nretain-sise = \"1GiB\"\n").unwrap();
        let err = AgentConfig::from_args(&args(&["--config", f]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "--config {f}: line 2: unknown field `retain-sise`"
            )),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_the_flag() {
        let msg = |argv: &[&str]| AgentConfig::from_args(&args(argv)).unwrap_err().to_string();
        assert!(msg(&["--interval", "10ms"]).starts_with("--interval"));
        assert!(msg(&["--retain-size", "lots"]).starts_with("--retain-size \"lots\""));
        assert!(msg(&["--metrics-addr", "localhost"]).starts_with("--metrics-addr"));
        assert!(msg(&["--push-pyroscope", "pyroscope:4040"]).contains("http:// or https://"));
        assert!(msg(&["--cgroup", "/tmp"]).starts_with("--cgroup"));
        assert!(msg(&["--config", "/nonexistent/agent.toml"]).starts_with("--config /nonexistent"));
    }

    #[test]
    fn file_errors_found_by_fuzzing() {
        // The TOML parser's message for this spans two lines ("invalid string\nexpected ...");
        // the error must stay one line (fuzz target agent_config).
        let err = parse_file("in=terval = \"2s\"\nretain-sise = \"\0\0\x0041GiB\"\n").unwrap_err();
        assert_eq!(err, "line 1: invalid string; expected `\"`, `'`");
    }

    #[test]
    fn described_strings_are_toml() {
        for s in [
            "plain",
            "a\"b\\c",
            "soft\u{ad}hyphen",
            "tab\tand\u{7f}del",
            "é/ü",
        ] {
            let line = format!("service-name = {}", toml_string(s));
            let file = parse_file(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(file.service_name.as_deref(), Some(s), "{line}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err() && parse_size("1 parsec").is_err());
    }
}
