//! The `cprof` binary: parse flags, run the command, map errors to one line and an exit code.

use std::process::ExitCode;

use clap::Parser as _;
use cprof::cli::{Cli, Command};
use cprof::config::RecordConfig;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CPROF_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cprof: error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Record(args) => {
            let config = RecordConfig::from_args(&args, &utc_timestamp())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = runtime.block_on(cprof::record::record(&config))?;
            print_ignoring_broken_pipe(&cprof::record::summary(&report));
            Ok(())
        }
    }
}

/// "context: cause: root cause" on one line.
fn one_line(err: &anyhow::Error) -> String {
    err.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn print_ignoring_broken_pipe(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// Now as `20261123T101500Z`.
fn utc_timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = cprof::civil::from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
