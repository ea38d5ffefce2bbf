//! Pushing each window's profiles to a profiling backend (Grafana Pyroscope), through an on-disk
//! spool so that an outage loses nothing within its caps.
//!
//! [`Pusher::submit`] encodes a `push.v1.PushRequest` and stores it in the spool ([`spool`]);
//! one sender thread posts the spooled requests, oldest first, to
//! `{url}/push.v1.PusherService/Push` (Connect unary call, protobuf body: [`client`]) and
//! deletes each one the backend accepts or refuses for good. Failed attempts back off
//! exponentially. What is not delivered at shutdown stays in the spool for the next start.

pub(crate) mod client;
pub mod proto;
pub(crate) mod spool;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};

pub use client::PUSH_PATH;
use client::{Client, Outcome};
use spool::Spool;

/// Where and how to push profiles.
#[derive(Clone, Debug)]
pub struct PushSettings {
    /// Base URL, without a trailing slash: `http://pyroscope:4040`.
    pub url: String,
    /// File holding `user:password` for HTTP basic auth.
    pub basic_auth_file: Option<PathBuf>,
    /// File holding a bearer token.
    pub bearer_token_file: Option<PathBuf>,
    /// Sent as `X-Scope-OrgID`.
    pub tenant: Option<String>,
}

/// What the pusher did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Requests the backend accepted.
    pub pushed: u64,
    /// Attempts that failed and will be retried.
    pub failed_attempts: u64,
    /// Requests given up: refused by the backend (4xx), or evicted from the full spool.
    pub dropped: u64,
    /// Requests waiting in the spool, and their bytes.
    pub spooled: u64,
    pub spool_bytes: u64,
}

/// One profile series: its labels (`__name__` and `service_name` are required) and one pprof
/// file, gzipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub pprof_gz: Vec<u8>,
}

/// One push request: the series of one window and signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushJob {
    /// Unique per window and signal, e.g. `cpu-20261122T101500Z`; names the spool file, so
    /// only ASCII letters, digits, `.`, `_` and `-` (not first), at most 200 bytes.
    pub name: String,
    pub series: Vec<Series>,
}

/// Bounds of the spool; the oldest requests are evicted first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolCaps {
    /// Total bytes of spooled requests (`u64::MAX`: no bound).
    pub max_bytes: u64,
    /// Age of a spooled request (`Duration::MAX`: no bound).
    pub max_age: Duration,
}

/// Timeouts and backoff of the sender. The defaults suit a real backend; tests shorten them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushTiming {
    /// Wait after the first failed attempt; doubles with each failure up to `backoff_max`, and
    /// starts over after a success.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Establishing the connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// The whole request, from connecting to reading the answer.
    pub request_timeout: Duration,
}

impl Default for PushTiming {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_mins(1),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters and spool, under one lock shared by [`Pusher`] and its sender thread.
#[derive(Debug)]
struct State {
    spool: Spool,
    pushed: u64,
    failed_attempts: u64,
    /// Refused, unreadable or oversized requests, and evicted ones whose attempt failed; the
    /// spool counts the other evictions.
    dropped: u64,
    stop: bool,
    sender_running: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signals new requests and `stop` to the sender, and the sender's exit to `shutdown`.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the counters or the index inconsistent enough to stop
        // pushing: keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A pusher ready to start: credentials read, spool opened and locked.
#[derive(Debug)]
pub struct PreparedPusher {
    client: Client,
    spool: Spool,
    timing: PushTiming,
    url: String,
    spool_dir: PathBuf,
}

impl PreparedPusher {
    /// Starts the sender thread, which first delivers what a previous run left in the spool.
    /// The thread drops every capability first: it only reads the spool, the credential files
    /// (which must be readable by our uid without capabilities) and talks to the network.
    pub fn start(self) -> anyhow::Result<Pusher> {
        let Self {
            client,
            spool,
            timing,
            url,
            spool_dir,
        } = self;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                spool,
                pushed: 0,
                failed_attempts: 0,
                dropped: 0,
                stop: false,
                sender_running: true,
            }),
            changed: Condvar::new(),
        });
        let sender = std::thread::Builder::new()
            .name("cprof-push".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    if let Err(e) = crate::privilege::drop_in_thread(0) {
                        tracing::warn!("push thread: cannot drop capabilities: {e}");
                    }
                    send_loop(&shared, client, timing);
                }
            })
            .context("cannot start the push thread")?;
        tracing::info!(url, spool = %spool_dir.display(), "pushing profiles");
        Ok(Pusher {
            shared,
            sender: Some(sender),
        })
    }
}

/// Pushes jobs through the spool to the backend, on its own thread.
#[derive(Debug)]
pub struct Pusher {
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
}

impl Pusher {
    /// Reads the credential files now (an unreadable or empty one is an error naming it),
    /// creates `spool_dir` (mode 0700) or takes over the one a previous run left, and starts
    /// the sender thread, which first delivers what that run left.
    pub fn start(
        settings: &PushSettings,
        spool_dir: &Path,
        caps: SpoolCaps,
    ) -> anyhow::Result<Self> {
        Self::start_with(settings, spool_dir, caps, PushTiming::default())
    }

    /// [`Pusher::start`] with other timeouts and backoff.
    pub fn start_with(
        settings: &PushSettings,
        spool_dir: &Path,
        caps: SpoolCaps,
        timing: PushTiming,
    ) -> anyhow::Result<Self> {
        Self::prepare_with(settings, spool_dir, caps, timing)?.start()
    }

    /// What [`Pusher::start`] does before it starts the sender thread: read the credential
    /// files, open the spool. The agent prepares before attaching the probes (a bad setting
    /// fails the start at once) and starts once capabilities are dropped.
    pub fn prepare(
        settings: &PushSettings,
        spool_dir: &Path,
        caps: SpoolCaps,
    ) -> anyhow::Result<PreparedPusher> {
        Self::prepare_with(settings, spool_dir, caps, PushTiming::default())
    }

    /// [`Pusher::prepare`] with other timeouts and backoff.
    pub fn prepare_with(
        settings: &PushSettings,
        spool_dir: &Path,
        caps: SpoolCaps,
        timing: PushTiming,
    ) -> anyhow::Result<PreparedPusher> {
        Ok(PreparedPusher {
            client: Client::new(settings, &timing)?,
            spool: Spool::open(spool_dir, caps)?,
            timing,
            url: settings.url.clone(),
            spool_dir: spool_dir.to_owned(),
        })
    }
    /// Encodes `job` and stores it in the spool (evicting the oldest requests beyond the caps),
    /// then wakes the sender. Never waits for the network.
    pub fn submit(&self, job: PushJob) -> anyhow::Result<()> {
        validate(&job)?;
        let PushJob { name, series } = job;
        let body = prost::Message::encode_to_vec(&proto::request(series));
        let mut state = self.shared.lock();
        if let Err(err) = state.spool.add(&name, &body) {
            state.dropped += 1;
            return Err(err.context(format!("push request {name} dropped")));
        }
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The counters so far, and the spool as it is now.
    #[must_use]
    pub fn stats(&self) -> PushStats {
        let state = self.shared.lock();
        PushStats {
            pushed: state.pushed,
            failed_attempts: state.failed_attempts,
            dropped: state.dropped + state.spool.evicted(),
            spooled: state.spool.len() as u64,
            spool_bytes: state.spool.bytes(),
        }
    }

    /// Stops the sender, waiting at most `within` for it to finish a request in flight. What is
    /// not delivered stays in the spool for the next start.
    pub fn shutdown(mut self, within: Duration) {
        self.request_stop();
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .changed
            .wait_timeout_while(state, within, |s| s.sender_running)
            .unwrap_or_else(PoisonError::into_inner);
        let finished = !state.sender_running;
        let left = state.spool.len();
        drop(state);
        if let Some(sender) = self.sender.take() {
            if finished {
                let _ = sender.join();
            } else {
                tracing::warn!(
                    ?within,
                    "the push thread is still sending; it is left to finish in the background"
                );
            }
        }
        if left > 0 {
            tracing::info!(
                requests = left,
                "push requests left in the spool for the next start"
            );
        }
    }

    fn request_stop(&self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        // Without `shutdown`: stop the sender without waiting.
        if self.sender.is_some() {
            self.request_stop();
        }
    }
}

/// Checks what the backend requires and what would make a bad file name.
fn validate(job: &PushJob) -> anyhow::Result<()> {
    if !spool::valid_job_name(&job.name) {
        bail!(
            "push job name {:?}: expected 1 to 200 ASCII letters, digits, '.', '_' or '-', not starting with '.'",
            job.name
        );
    }
    if job.series.is_empty() {
        bail!("push job {} has no series", job.name);
    }
    for series in &job.series {
        for required in ["__name__", "service_name"] {
            if !series
                .labels
                .iter()
                .any(|(name, value)| name == required && !value.is_empty())
            {
                bail!("push job {}: a series has no {required} label", job.name);
            }
        }
        let mut names: Vec<&str> = series.labels.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(twice) = names.windows(2).find_map(|w| match w {
            [a, b] if a == b => Some(*a),
            _ => None,
        }) {
            bail!(
                "push job {}: label {twice} appears twice in a series",
                job.name
            );
        }
        if series.pprof_gz.is_empty() {
            bail!("push job {}: a series has an empty profile", job.name);
        }
    }
    Ok(())
}

/// Sets `sender_running` to false when the sender exits, even by a panic.
struct RunningGuard<'a>(&'a Shared);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().sender_running = false;
        self.0.changed.notify_all();
    }
}

/// The sender thread: oldest request first, one at a time, until asked to stop.
fn send_loop(shared: &Shared, mut client: Client, timing: PushTiming) {
    let _running = RunningGuard(shared);
    let mut backoff = timing.backoff_initial;
    // Failed attempts in a row: the first one of an outage is a warning, the rest debug.
    let mut failures_in_row = 0_u64;
    loop {
        let taken = {
            let mut state = shared.lock();
            loop {
                if state.stop {
                    return;
                }
                state.spool.expire(SystemTime::now());
                match state.spool.take_oldest() {
                    Some(Ok(taken)) => break taken,
                    Some(Err(err)) => {
                        tracing::warn!("dropping a spooled push request: {err:#}");
                        state.dropped += 1;
                    }
                    None => {
                        state = shared
                            .changed
                            .wait_while(state, |s| !s.stop && s.spool.is_empty())
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
        };

        let started = Instant::now();
        let outcome = client.push(&taken.body);
        let mut state = shared.lock();
        let evicted = state.spool.finish(taken.seq);
        match outcome {
            Outcome::Delivered => {
                if !evicted {
                    state.spool.remove(taken.seq);
                }
                state.pushed += 1;
                if failures_in_row > 0 {
                    tracing::info!(
                        failed_attempts = failures_in_row,
                        "push backend reachable again"
                    );
                }
                failures_in_row = 0;
                backoff = timing.backoff_initial;
                tracing::debug!(
                    request = taken.name,
                    bytes = taken.body.len(),
                    elapsed = ?started.elapsed(),
                    "pushed"
                );
            }
            Outcome::Refused { status, message } => {
                if !evicted {
                    state.spool.remove(taken.seq);
                }
                state.dropped += 1;
                tracing::warn!(
                    request = taken.name,
                    status,
                    "the push backend refused a request; dropped: {message}"
                );
            }
            Outcome::Retry { reason } => {
                state.failed_attempts += 1;
                if evicted {
                    state.dropped += 1;
                }
                failures_in_row += 1;
                if failures_in_row == 1 {
                    tracing::warn!(
                        request = taken.name,
                        retry_in = ?backoff,
                        "push failed; requests stay in the spool and are retried: {reason}"
                    );
                } else {
                    tracing::debug!(
                        request = taken.name,
                        attempt = failures_in_row,
                        retry_in = ?backoff,
                        "push failed: {reason}"
                    );
                }
                // Only a stop ends the wait early: new requests do not make the backend
                // reachable sooner.
                let (next, _) = shared
                    .changed
                    .wait_timeout_while(state, backoff, |s| !s.stop)
                    .unwrap_or_else(PoisonError::into_inner);
                state = next;
                backoff = (backoff * 2).min(timing.backoff_max);
            }
        }
        drop(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(labels: &[(&str, &str)]) -> Series {
        Series {
            labels: labels
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            pprof_gz: vec![1],
        }
    }

    fn job(name: &str, series: Vec<Series>) -> PushJob {
        PushJob {
            name: name.into(),
            series,
        }
    }

    #[test]
    fn jobs_are_validated() {
        let good = series(&[("__name__", "process_cpu"), ("service_name", "web")]);
        validate(&job("cpu-1", vec![good.clone()])).unwrap();
        let err = |j: &PushJob| validate(j).unwrap_err().to_string();
        assert!(err(&job("../x", vec![good.clone()])).contains("push job name"));
        assert!(err(&job("cpu-1", vec![])).contains("no series"));
        assert!(
            err(&job("cpu-1", vec![series(&[("__name__", "process_cpu")])]))
                .contains("no service_name label")
        );
        let twice = series(&[
            ("__name__", "process_cpu"),
            ("service_name", "web"),
            ("service_name", "db"),
        ]);
        assert!(err(&job("cpu-1", vec![twice])).contains("appears twice"));
    }

    #[test]
    fn submit_spools_and_counts_an_oversized_job_as_dropped() {
        let dir = std::env::temp_dir().join(format!("cprof-pusher-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = PushSettings {
            // Nothing listens on port 1: every attempt fails and backs off for an hour.
            url: "http://127.0.0.1:1".into(),
            basic_auth_file: None,
            bearer_token_file: None,
            tenant: None,
        };
        let timing = PushTiming {
            backoff_initial: Duration::from_hours(1),
            ..PushTiming::default()
        };
        let caps = SpoolCaps {
            max_bytes: 1000,
            max_age: Duration::MAX,
        };
        let pusher = Pusher::start_with(&settings, &dir, caps, timing).unwrap();
        let good = series(&[("__name__", "process_cpu"), ("service_name", "web")]);
        pusher.submit(job("cpu-1", vec![good.clone()])).unwrap();
        let mut big = good;
        big.pprof_gz = vec![0; 2000];
        let err = pusher.submit(job("cpu-2", vec![big])).unwrap_err();
        assert!(format!("{err:#}").contains("cpu-2 dropped"), "{err:#}");
        let stats = pusher.stats();
        assert_eq!((stats.spooled, stats.dropped), (1, 1), "{stats:?}");
        let started = Instant::now();
        pusher.shutdown(Duration::from_secs(5));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a stop ends the backoff"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
