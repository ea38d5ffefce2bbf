//! `cprof agent --config` files ([`cprof::agent::config::parse_file`], then
//! [`AgentConfig::from_args`]): a file that does not parse is refused with one line naming a
//! line of the file, and the settings a file gives, as `--check-config` prints them
//! ([`AgentConfig::describe`]), load again to the same settings.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::Parser as _;
use cprof::agent::config::{AgentConfig, AgentConfigError, parse_file};
use cprof::cli::{Cli, Command};
use libfuzzer_sys::fuzz_target;

/// Where each input is written for `--config`: one file per fuzzing process.
fn scratch() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("cprof-fuzz-agent-config-{}.toml", std::process::id()))
    })
}

fn load(text: &str) -> Result<AgentConfig, AgentConfigError> {
    std::fs::write(scratch(), text).expect("writing the scratch config file");
    let path = scratch().to_str().expect("a UTF-8 temp dir");
    let cli = Cli::try_parse_from(["cprof", "agent", "--config", path]).expect("valid flags");
    let Command::Agent(args) = cli.command else {
        unreachable!("the agent command was given");
    };
    AgentConfig::from_args(&args)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(message) = parse_file(text) {
        assert!(!message.contains('\n'), "not one line: {message:?}");
        if let Some(rest) = message.strip_prefix("line ") {
            let line: usize = rest.split(':').next().unwrap().parse().unwrap();
            let lines = text.split('\n').count();
            assert!((1..=lines).contains(&line), "line {line} of {lines}: {message}");
        }
        return;
    }
    let Ok(config) = load(text) else {
        return;
    };
    let described = config.describe();
    let again = load(&described)
        .unwrap_or_else(|e| panic!("the described settings do not load: {e}\n{described}"));
    assert_eq!(again.describe(), described, "loading the described settings changed them");
});
