//! Bad input and missing privileges: one clear line, a non-zero exit, nothing written.

use std::process::{Command, Stdio};

use crate::util;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = util::cprof()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running cprof");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(args: &[&str], stderr: &str, expected: &str) {
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "cprof {args:?}: expected one line, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("cprof: error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(expected),
        "cprof {args:?}: expected {expected:?} in {:?}",
        lines[0]
    );
}

#[test]
fn a_pid_that_does_not_exist() {
    let dir = util::out_dir("nopid");
    let dir_s = dir.to_str().unwrap();
    // Above the largest pid_max (2^22): never a process.
    let args = [
        "record",
        "--pid",
        "4194305",
        "--duration",
        "1",
        "--output",
        dir_s,
    ];
    let (ok, _, stderr) = run(&args);
    assert!(!ok);
    assert_one_line_error(&args, &stderr, "--pid 4194305: no such process");
    assert!(!dir.exists(), "nothing written for a bad pid");
}

#[test]
fn bad_flag_values() {
    for (args, expected) in [
        (
            &["record", "--frequency", "0"][..],
            "--frequency 0: must be between 1 and 10000 Hz",
        ),
        (&["record", "--frequency", "20000"][..], "--frequency 20000"),
        (&["record", "--duration", "soon"][..], "--duration \"soon\""),
        (
            &["record", "--duration", "0"][..],
            "must be greater than zero",
        ),
        (&["record", "--pid", "0"][..], "--pid 0 is not a process"),
    ] {
        let (ok, _, stderr) = run(args);
        assert!(!ok, "{args:?} should fail");
        assert_one_line_error(args, &stderr, expected);
    }
    let (ok, _, stderr) = run(&["record", "--pid", "abc"]);
    assert!(!ok);
    assert!(
        stderr.contains("invalid value 'abc' for '--pid <PID>'"),
        "{stderr}"
    );
}

#[test]
fn an_unwritable_output_directory_fails_before_recording() {
    util::require_root();
    let args = [
        "record",
        "--duration",
        "1",
        "--output",
        "/proc/cprof-cannot-exist",
    ];
    let (ok, _, stderr) = run(&args);
    assert!(!ok);
    assert_one_line_error(
        &args,
        &stderr,
        "cannot create output directory /proc/cprof-cannot-exist",
    );
}

/// Run as nobody with no capabilities, then with `CAP_BPF` only: the missing ones are named.
#[test]
fn missing_capabilities_are_named() {
    util::require_root();
    let dir = std::env::temp_dir().join("cprof-caps-test");
    let dir_s = dir.to_str().unwrap();
    let cprof = env!("CARGO_BIN_EXE_cprof");
    for (caps, expected) in [
        (None, "missing capabilities CAP_BPF, CAP_PERFMON"),
        (Some("+bpf"), "missing capabilities CAP_PERFMON:"),
    ] {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        if let Some(caps) = caps {
            cmd.args([
                format!("--inh-caps={caps}"),
                format!("--ambient-caps={caps}"),
            ]);
        }
        let out = cmd
            .args([cprof, "record", "--duration", "1", "--output", dir_s])
            .output()
            .expect("running setpriv (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "as nobody with {caps:?} cprof must fail"
        );
        assert_one_line_error(&[], &stderr, expected);
    }
    assert!(!dir.exists(), "nothing written without privileges");
}

#[test]
fn help_teaches() {
    let (ok, stdout, _) = run(&["record", "--help"]);
    assert!(ok);
    for needle in [
        "--pid",
        "--duration",
        "--frequency",
        "--output",
        "CAP_BPF",
        "go tool pprof",
    ] {
        assert!(
            stdout.contains(needle),
            "record --help lacks {needle}:\n{stdout}"
        );
    }
}
