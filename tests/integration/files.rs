//! Output directories must be ours: a directory others may write to (or that is a symlink, or
//! belongs to someone else) is refused in one line before anything is loaded, and a symlink
//! planted at a final file name is replaced, never followed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::util::{self, BpfObjects};

/// A scratch directory for one test (its parent is not world-writable).
fn base(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("files-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs `cprof <args>`; expects a failure with one line containing `expected`, and nothing
/// loaded into the kernel.
fn assert_refused(args: &[&str], expected: &str) -> String {
    let before = BpfObjects::now();
    let out = util::cprof()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running cprof");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "cprof {args:?} must fail");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "cprof {args:?}: one line, got:\n{stderr}");
    assert!(
        lines[0].starts_with("cprof: error: ") && lines[0].contains(expected),
        "cprof {args:?}: expected {expected:?} in {:?}",
        lines[0]
    );
    util::assert_bpf_released(&before, Duration::from_secs(3), &format!("{args:?}"));
    lines[0].to_owned()
}

#[test]
fn output_directories_others_control_are_refused() {
    util::require_root();
    let base = base("refused");
    let s = |p: &Path| p.to_str().unwrap().to_owned();

    let shared = base.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let line = assert_refused(
        &["record", "--duration", "1", "--output", &s(&shared)],
        "it is writable by everyone (mode 777)",
    );
    eprintln!("{line}");
    let inside = shared.join("prof");
    assert_refused(
        &["record", "--duration", "1", "--output", &s(&inside)],
        "is writable by everyone: use a directory of our own",
    );
    assert!(
        !inside.exists(),
        "nothing created in a world-writable directory"
    );
    // The agent's state directory too.
    assert_refused(
        &[
            "agent",
            "--metrics-addr",
            "off",
            "--output-dir",
            &s(&shared),
        ],
        "it is writable by everyone",
    );

    let tmp = std::env::temp_dir().join(format!("cprof-files-test-{}", std::process::id()));
    let line = assert_refused(
        &["record", "--duration", "1", "--output", &s(&tmp)],
        "/tmp is writable by everyone",
    );
    eprintln!("{line}");
    assert!(!tmp.exists());

    let group = base.join("group");
    std::fs::create_dir(&group).unwrap();
    std::fs::set_permissions(&group, std::fs::Permissions::from_mode(0o770)).unwrap();
    assert_refused(
        &["record", "--duration", "1", "--output", &s(&group)],
        "writable by its group (mode 770)",
    );

    let link = base.join("link");
    let mine = base.join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    assert_refused(
        &["record", "--duration", "1", "--output", &s(&link)],
        "it is a symlink",
    );

    let theirs = base.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65_534), Some(65_534)).unwrap();
    assert_refused(
        &["record", "--duration", "1", "--output", &s(&theirs)],
        "it belongs to uid 65534, not to us (uid 0)",
    );
    std::fs::remove_dir_all(&base).unwrap();
}

/// A symlink at `cpu.pb.gz` pointing at a file elsewhere: the profile replaces the link, the
/// file it pointed at is untouched.
#[test]
fn a_symlink_at_a_final_name_is_replaced_not_followed() {
    util::require_root();
    let base = base("symlink");
    let dir = base.join("out");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = base.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("cpu.pb.gz")).unwrap();
    let w = util::Workload::start("calltree", &["10"]);
    util::record_pid(w.pid(), "1", "99", &dir);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "not followed");
    let meta = std::fs::symlink_metadata(dir.join("cpu.pb.gz")).unwrap();
    assert!(meta.is_file(), "the profile replaced the symlink");
    assert_eq!(util::assert_complete_files(&dir, "symlink"), ["cpu.pb.gz"]);
    std::fs::remove_dir_all(&base).unwrap();
}
