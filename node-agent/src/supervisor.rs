//! The long-running fill loop of `run` and `standalone --serve`: fills run
//! concurrently (bounded per node), each with an overall deadline and a
//! minimum-throughput guard; a failed fill is retried with exponential
//! backoff and jitter; changes to the wanted set take effect at once (a fill
//! nobody wants any more is stopped); generations nobody wants and no pod
//! mounts are freed before new fills look for room.
//!
//! Scheduling decisions ([`next_actions`], [`backoff`]) are pure functions
//! over a snapshot, unit-tested below; this file's loop only carries them out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::task::JoinSet;
use zerocopy_api::format::{generation_digest, LOCAL_NAMESPACE};
use zerocopy_api::labels::UPLOAD_TOKEN_ANNOTATION;

use crate::csi::catalog::{Catalog, Failure, FillState};
use crate::csi::ledger::Ledger;
use crate::csi::metrics::Metrics;
use crate::error::FillError;
use crate::fill::{FillEngine, FillOutcome};
use crate::layout::{processes_using_each, GenerationEntry};
use crate::manifests::LoadedWrapper;

/// `(namespace, name, generation)`
pub type GenKey = (String, String, String);

/// How fills are scheduled and retried.
#[derive(Debug, Clone)]
pub struct FillPolicy {
    /// Fills running at once on this node.
    pub max_parallel: usize,
    /// A fill that runs longer is stopped and retried.
    pub deadline: Duration,
    /// A fill that receives less than this many bytes per second over a
    /// whole `throughput_window` is stopped as stalled and retried.
    pub min_bytes_per_second: u64,
    /// The window of the throughput guard.
    pub throughput_window: Duration,
    /// First retry delay; doubles per failure.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Remove generations of wrappers that are not wanted at all (cluster
    /// mode, `--prune`); superseded generations are always removed.
    pub prune: bool,
}

impl Default for FillPolicy {
    fn default() -> Self {
        Self {
            max_parallel: 2,
            deadline: Duration::from_secs(6 * 3600),
            min_bytes_per_second: 64 << 10,
            throughput_window: Duration::from_secs(120),
            retry_base: Duration::from_secs(10),
            retry_max: Duration::from_secs(900),
            prune: true,
        }
    }
}

/// How often a fill waiting for an upload or a peer looks again.
pub const WAITING_RETRY: Duration = Duration::from_secs(1);

/// How often generations kept only because processes used them, or whose
/// removal failed, are looked at again. Nothing else announces that the last
/// process mapping a generation exited, so without this a generation kept
/// once would stay until the wanted set happened to change again.
pub const IN_USE_RECHECK: Duration = Duration::from_secs(5);

/// Delay before attempt `attempts + 1`: base × 2^(attempts−1), capped, times
/// a jitter factor in [0.8, 1.2) so nodes that failed together do not retry
/// together. `jitter` is in [0, 1).
pub fn backoff(attempts: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let doubled = base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    doubled.min(max).mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

/// What the loop knows about one wanted generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Track {
    /// Complete on the node.
    Ready,
    /// A fill is running.
    Running,
    /// Failed; may start again at `retry_at` (never when `None`).
    Failed {
        /// When the next attempt may start.
        retry_at: Option<Instant>,
    },
    /// Nothing yet.
    Idle,
}

/// One step the loop should take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start filling this generation.
    Start(GenKey),
    /// Stop this fill: nobody wants it any more.
    Abort(GenKey),
}

/// Which fills to start and stop (pure). `wanted` in order of priority;
/// `tracks` has every generation the loop knows, wanted or not; `stopping`
/// are fills told to stop whose task has not ended yet: they still hold a
/// slot, and their generation cannot start again until they have ended.
pub fn next_actions(
    wanted: &[GenKey],
    tracks: &BTreeMap<GenKey, Track>,
    stopping: &BTreeSet<GenKey>,
    max_parallel: usize,
    now: Instant,
) -> Vec<Action> {
    let wanted_set: BTreeSet<&GenKey> = wanted.iter().collect();
    let mut actions: Vec<Action> = tracks
        .iter()
        .filter(|(k, t)| **t == Track::Running && !wanted_set.contains(k))
        .map(|(k, _)| Action::Abort(k.clone()))
        .collect();
    let mut running = tracks
        .iter()
        .filter(|(k, t)| **t == Track::Running && wanted_set.contains(k))
        .count()
        + stopping.len();
    for key in wanted {
        if running >= max_parallel {
            break;
        }
        if stopping.contains(key) {
            continue;
        }
        let due = match tracks.get(key).unwrap_or(&Track::Idle) {
            Track::Idle => true,
            Track::Failed { retry_at: Some(at) } => *at <= now,
            Track::Failed { retry_at: None } | Track::Ready | Track::Running => false,
        };
        if due {
            actions.push(Action::Start(key.clone()));
            running += 1;
        }
    }
    actions
}

/// The earliest retry among failed, wanted generations.
pub fn next_retry(wanted: &[GenKey], tracks: &BTreeMap<GenKey, Track>) -> Option<Instant> {
    wanted
        .iter()
        .filter_map(|k| match tracks.get(k) {
            Some(Track::Failed { retry_at }) => *retry_at,
            _ => None,
        })
        .min()
}

struct Running {
    handle: tokio::task::AbortHandle,
    started: Instant,
    window_start: Instant,
    window_bytes: u64,
}

/// The loop's state: what runs, what failed and when it retries.
pub struct Supervisor {
    engine: Arc<FillEngine>,
    catalog: Arc<Catalog>,
    ledger: Arc<Ledger>,
    metrics: Metrics,
    policy: FillPolicy,
    tracks: BTreeMap<GenKey, Track>,
    attempts: BTreeMap<GenKey, u32>,
    running: BTreeMap<GenKey, Running>,
    tasks: JoinSet<(GenKey, Result<FillOutcome, FillError>)>,
    /// Tasks told to stop that have not ended yet.
    stopping: BTreeMap<tokio::task::Id, GenKey>,
    specs: BTreeMap<GenKey, LoadedWrapper>,
    /// Unwanted generations the last collection kept (in use, or their
    /// removal failed): looked at again at `recheck_at`.
    kept: BTreeSet<GenKey>,
    recheck_at: Option<Instant>,
}

impl Supervisor {
    /// A supervisor over the shared state of the CSI server.
    pub fn new(
        engine: Arc<FillEngine>,
        catalog: Arc<Catalog>,
        ledger: Arc<Ledger>,
        metrics: Metrics,
        policy: FillPolicy,
    ) -> Self {
        Self {
            engine,
            catalog,
            ledger,
            metrics,
            policy,
            tracks: BTreeMap::new(),
            attempts: BTreeMap::new(),
            running: BTreeMap::new(),
            tasks: JoinSet::new(),
            stopping: BTreeMap::new(),
            specs: BTreeMap::new(),
            kept: BTreeSet::new(),
            recheck_at: None,
        }
    }

    /// `<wrapper>/current` → the wanted generation, now Ready (a rollback to
    /// a generation still on disk, or one filled before `current` existed).
    fn point_current(&self, ns: &str, name: &str, generation: &str) {
        if let Err(e) = self.engine.root().set_current(ns, name, generation) {
            tracing::warn!(wrapper = %format!("{ns}/{name}"), generation, error = %e, "could not point `current` at the Ready generation");
        }
    }

    /// Takes a new wanted set: the catalog (what publishes see) changes at
    /// once, complete generations are Ready at once (an agent restart does
    /// not flip them to Pending), and the rest is queued.
    pub fn set_wanted(&mut self, wrappers: &[LoadedWrapper]) {
        self.catalog.set_wanted(wrappers.iter().map(|w| {
            let token = w
                .wrapper
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(UPLOAD_TOKEN_ANNOTATION))
                .cloned();
            ((w.namespace.clone(), w.name.clone()), w.wrapper.spec.clone(), token)
        }));
        self.specs = wrappers
            .iter()
            .map(|w| {
                let key = (w.namespace.clone(), w.name.clone(), generation_digest(&w.wrapper.spec));
                (key, w.clone())
            })
            .collect();
        let keys: Vec<GenKey> = self.specs.keys().cloned().collect();
        for key in keys {
            let (ns, name, generation) = &key;
            let complete = self.engine.root().read_manifest(ns, name, generation).is_some();
            match self.tracks.get(&key) {
                _ if complete => {
                    self.tracks.insert(key.clone(), Track::Ready);
                    self.point_current(ns, name, generation);
                    self.catalog.set_state(ns, name, generation, FillState::Ready);
                }
                Some(Track::Running | Track::Failed { .. }) => {}
                _ => {
                    self.tracks.insert(key.clone(), Track::Idle);
                    self.catalog.set_state(ns, name, generation, FillState::Pending);
                }
            }
        }
        // Forget failures of generations nobody wants: a later want starts afresh.
        let specs = &self.specs;
        self.tracks.retain(|k, t| specs.contains_key(k) || *t == Track::Running);
        self.attempts.retain(|k, _| specs.contains_key(k));
        // What is no longer wanted goes now, not at the next fill.
        self.collect_garbage();
    }

    fn wanted_keys(&self) -> Vec<GenKey> {
        self.specs.keys().cloned().collect()
    }

    /// Cuts off stalled fills, frees what nobody wants, then starts and
    /// stops fills.
    pub fn step(&mut self) {
        self.guard_throughput();
        if self.recheck_at.is_some_and(|at| at <= Instant::now()) {
            // Kept generations whose users may have gone.
            self.collect_garbage();
        }
        let wanted = self.wanted_keys();
        let stopping: BTreeSet<GenKey> = self.stopping.values().cloned().collect();
        let actions = next_actions(
            &wanted,
            &self.tracks,
            &stopping,
            self.policy.max_parallel,
            Instant::now(),
        );
        for a in &actions {
            if let Action::Abort(key) = a {
                if self.stop(key) {
                    tracing::info!(wrapper = %format!("{}/{}", key.0, key.1), generation = %key.2, "stopped a fill nobody wants any more");
                }
                self.tracks.remove(key);
            }
        }
        if actions.iter().any(|a| matches!(a, Action::Start(_))) {
            // Room for new fills: superseded and unwanted generations first.
            self.collect_garbage();
        }
        for a in actions {
            if let Action::Start(key) = a {
                self.start(key);
            }
        }
    }

    /// Tells a running fill to stop; it keeps its slot until its task ended.
    fn stop(&mut self, key: &GenKey) -> bool {
        let Some(r) = self.running.remove(key) else {
            return false;
        };
        r.handle.abort();
        self.stopping.insert(r.handle.id(), key.clone());
        true
    }

    fn start(&mut self, key: GenKey) {
        let Some(w) = self.specs.get(&key).cloned() else {
            return;
        };
        let (ns, name, generation) = key.clone();
        self.catalog
            .set_state(&ns, &name, &generation, FillState::Filling(Default::default()));
        let engine = self.engine.clone();
        let progress = self.catalog.progress(&ns, &name, &generation);
        let deadline = self.policy.deadline;
        let task_key = key.clone();
        let handle = self.tasks.spawn(async move {
            let fill = engine.fill(&w.namespace, &w.name, &w.wrapper.spec, &progress);
            let outcome = match tokio::time::timeout(deadline, fill).await {
                Ok(outcome) => outcome,
                Err(_) => Err(FillError::Deadline {
                    wrapper: format!("{}/{}", w.namespace, w.name),
                    seconds: deadline.as_secs(),
                }),
            };
            (task_key, outcome)
        });
        let now = Instant::now();
        self.running.insert(
            key.clone(),
            Running {
                handle,
                started: now,
                window_start: now,
                window_bytes: 0,
            },
        );
        self.tracks.insert(key, Track::Running);
    }

    /// Records a finished fill; `task` is the task that ran it, so a result
    /// of an earlier, stopped fill of the same generation is ignored. Returns
    /// the task's handle (the stall guard stops it).
    fn finished(
        &mut self,
        key: GenKey,
        task: tokio::task::Id,
        outcome: Result<FillOutcome, FillError>,
    ) -> Option<tokio::task::AbortHandle> {
        if self.running.get(&key).is_none_or(|r| r.handle.id() != task) {
            return None; // stopped, or superseded while it ran
        }
        let run = self.running.remove(&key)?;
        let (ns, name, generation) = &key;
        let wanted = self.specs.contains_key(&key);
        match outcome {
            Ok(outcome) => {
                if let FillOutcome::Filled { manifest, seconds } = &outcome {
                    self.metrics
                        .fill_bytes_total
                        .with_label_values(&[ns, name])
                        .inc_by(manifest.total_bytes);
                    self.metrics.fill_seconds.with_label_values(&["ok"]).observe(*seconds);
                }
                self.attempts.remove(&key);
                self.tracks.insert(key.clone(), Track::Ready);
                if wanted {
                    self.point_current(ns, name, generation);
                }
                self.catalog.set_state(ns, name, generation, FillState::Ready);
                if !wanted {
                    self.tracks.remove(&key);
                }
            }
            Err(e) => {
                self.metrics
                    .fill_seconds
                    .with_label_values(&[e.category()])
                    .observe(run.started.elapsed().as_secs_f64());
                if !wanted {
                    self.tracks.remove(&key);
                    return Some(run.handle);
                }
                let attempts = self.attempts.entry(key.clone()).or_insert(0);
                *attempts += 1;
                // Waiting for an upload or a peer is no failure of the source:
                // look again soon, at a steady pace.
                let delay = if matches!(e, FillError::WaitingForSource { .. }) {
                    Some(WAITING_RETRY.min(self.policy.retry_max))
                } else {
                    e.is_retryable()
                        .then(|| backoff(*attempts, self.policy.retry_base, self.policy.retry_max, jitter()))
                };
                if matches!(e, FillError::WaitingForSource { .. }) {
                    if *attempts == 1 || (*attempts).is_multiple_of(60) {
                        tracing::info!(wrapper = %format!("{ns}/{name}"), %generation, attempts = *attempts, reason = %e, "waiting for a source");
                    }
                } else {
                    tracing::error!(wrapper = %format!("{ns}/{name}"), %generation, reason = e.reason(), attempts = *attempts,
                        retry_in_s = delay.map(|d| d.as_secs_f64()), error = %e, "fill failed");
                }
                self.catalog.set_state(
                    ns,
                    name,
                    generation,
                    FillState::Failed(Failure {
                        message: e.to_string(),
                        reason: e.reason(),
                        attempts: *attempts,
                        retry_at: delay.map(|d| SystemTime::now() + d),
                    }),
                );
                self.tracks.insert(
                    key,
                    Track::Failed {
                        retry_at: delay.map(|d| Instant::now() + d),
                    },
                );
            }
        }
        Some(run.handle)
    }

    /// Stops fills whose throughput stayed under the floor for a whole window.
    fn guard_throughput(&mut self) {
        let window = self.policy.throughput_window;
        let floor = self.policy.min_bytes_per_second;
        let now = Instant::now();
        let mut stalled = Vec::new();
        for (key, run) in &mut self.running {
            let done: u64 = match self.catalog.state(&key.0, &key.1, &key.2) {
                FillState::Filling(progress) => progress.bytes_done(),
                _ => continue,
            };
            if now.duration_since(run.window_start) < window {
                continue;
            }
            let got = done.saturating_sub(run.window_bytes);
            if got < floor.saturating_mul(window.as_secs()) {
                stalled.push((key.clone(), got));
            }
            run.window_start = now;
            run.window_bytes = done;
        }
        for (key, got) in stalled {
            let Some(task) = self.running.get(&key).map(|r| r.handle.id()) else {
                continue;
            };
            // Record the failure first (it needs the running entry), then
            // stop the task; it holds its slot until it has ended.
            let stalled = FillError::Stalled {
                wrapper: format!("{}/{}", key.0, key.1),
                bytes: got,
                window: window.as_secs(),
                min_per_second: floor,
            };
            if let Some(handle) = self.finished(key.clone(), task, Err(stalled)) {
                handle.abort();
                self.stopping.insert(handle.id(), key);
            }
        }
    }

    fn running_or_stopping(&self) -> usize {
        self.running.len() + self.stopping.len()
    }

    /// Removes complete generations that no wrapper wants (superseded ones
    /// always; those of unwanted wrappers with `prune`), that no publication
    /// mounts and no process maps or holds open. Python's `local` namespace
    /// is not ours. What it keeps because processes use it (or could not
    /// remove) is looked at again [`IN_USE_RECHECK`] later, until it goes.
    pub fn collect_garbage(&mut self) {
        // Reads mountinfo and every process's maps, unmounts: off the reactor.
        let kept = tokio::task::block_in_place(|| self.collect_garbage_blocking());
        self.recheck_at = (!kept.is_empty()).then(|| Instant::now() + IN_USE_RECHECK);
        self.kept = kept;
    }

    fn collect_garbage_blocking(&self) -> BTreeSet<GenKey> {
        let Ok(generations) = self.engine.root().generations() else {
            // Unreadable for now: look again later.
            return self.kept.clone();
        };
        let wanted_wrappers: BTreeSet<(String, String)> =
            self.specs.keys().map(|(ns, n, _)| (ns.clone(), n.clone())).collect();
        let candidates: Vec<GenerationEntry> = generations
            .into_iter()
            .filter(|g| g.namespace != LOCAL_NAMESPACE && g.manifest.is_some())
            .filter(|g| {
                let key = (g.namespace.clone(), g.name.clone(), g.generation.clone());
                !self.specs.contains_key(&key) && !self.running.contains_key(&key)
            })
            .filter(|g| self.policy.prune || wanted_wrappers.contains(&(g.namespace.clone(), g.name.clone())))
            // Freed by the unpublish of its last publication.
            .filter(|g| !self.ledger.references(&g.namespace, &g.name, &g.generation))
            .collect();
        let paths: Vec<&std::path::Path> = candidates.iter().map(|g| g.path.as_path()).collect();
        let users = processes_using_each(&paths);
        let mut kept = BTreeSet::new();
        for (g, users) in candidates.iter().zip(users) {
            let key = (g.namespace.clone(), g.name.clone(), g.generation.clone());
            let wrapper = format!("{}/{}", g.namespace, g.name);
            if !users.is_empty() {
                self.metrics
                    .gc_kept_total
                    .with_label_values(&[&g.namespace, &g.name])
                    .inc();
                if !self.kept.contains(&key) {
                    tracing::info!(%wrapper, generation = %g.generation, ?users,
                        "kept generation: processes map or hold its files; freed once they are gone");
                }
                kept.insert(key);
                continue;
            }
            match self.engine.root().remove_generation(g) {
                Ok(()) => tracing::info!(%wrapper, generation = %g.generation,
                    "freed generation: no replica wants it and no pod mounts or maps it"),
                Err(e) => {
                    if !self.kept.contains(&key) {
                        tracing::warn!(%wrapper, generation = %g.generation, error = %e, "could not free generation; trying again");
                    }
                    kept.insert(key);
                }
            }
        }
        kept
    }

    /// Waits for the next event (a fill ended, a retry is due, the guard's
    /// tick) and handles it. Returns when something may need a new step.
    pub async fn wait(&mut self) {
        let wanted = self.wanted_keys();
        // A due retry only matters when a slot is free; otherwise the loop
        // would wake at once, again and again, until a fill ends.
        let slot_free = self.running_or_stopping() < self.policy.max_parallel;
        let retry = slot_free.then(|| next_retry(&wanted, &self.tracks)).flatten();
        let tick = Duration::from_secs(1).min(self.policy.throughput_window);
        let now = Instant::now();
        let sleep_until = retry
            .into_iter()
            .chain(self.recheck_at)
            .min()
            .map(|r| r.max(now + Duration::from_millis(50)).min(now + tick))
            .unwrap_or(now + tick);
        tokio::select! {
            Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                match joined {
                    Ok((task, (key, outcome))) => {
                        self.stopping.remove(&task);
                        let _ = self.finished(key, task, outcome);
                    }
                    Err(e) => {
                        self.stopping.remove(&e.id());
                        if !e.is_cancelled() {
                            tracing::error!(error = %e, "fill task panicked");
                            // The running entry of a panicked task would hold its slot forever.
                            self.running.retain(|_, r| r.handle.id() != e.id());
                        }
                    }
                }
                // Freed room and superseded generations.
                self.collect_garbage();
            }
            // The next step checks throughput and starts due retries.
            _ = tokio::time::sleep_until(sleep_until.into()) => {}
        }
    }
}

/// A jitter sample in [0, 1) without a random-number crate: the clock's
/// nanoseconds mixed with the process id.
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mixed = (u64::from(nanos) ^ (u64::from(std::process::id()) << 17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> GenKey {
        ("ns".into(), n.into(), "g".into())
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let (base, max) = (Duration::from_secs(10), Duration::from_secs(900));
        assert_eq!(backoff(1, base, max, 0.5), Duration::from_secs(10));
        assert_eq!(backoff(2, base, max, 0.5), Duration::from_secs(20));
        assert_eq!(backoff(4, base, max, 0.5), Duration::from_secs(80));
        assert_eq!(backoff(30, base, max, 0.5), max);
        assert_eq!(backoff(1, base, max, 0.0), Duration::from_secs(8));
        assert!(backoff(1, base, max, 0.999) < Duration::from_secs(12));
        assert!((0.0..1.0).contains(&jitter()));
    }

    #[test]
    fn fills_start_in_order_up_to_the_limit() {
        let now = Instant::now();
        let wanted = vec![key("a"), key("b"), key("c")];
        let tracks = BTreeMap::from([(key("a"), Track::Ready)]);
        assert_eq!(
            next_actions(&wanted, &tracks, &BTreeSet::new(), 1, now),
            vec![Action::Start(key("b"))],
            "one slot: the first that is not Ready"
        );
        let tracks = BTreeMap::from([(key("a"), Track::Running)]);
        assert_eq!(next_actions(&wanted, &tracks, &BTreeSet::new(), 1, now), vec![]);
        assert_eq!(
            next_actions(&wanted, &tracks, &BTreeSet::new(), 2, now),
            vec![Action::Start(key("b"))]
        );
    }

    #[test]
    fn failures_wait_for_their_retry_time_and_unwanted_fills_stop() {
        let now = Instant::now();
        let wanted = vec![key("a"), key("b")];
        let later = now + Duration::from_secs(30);
        let tracks = BTreeMap::from([
            (key("a"), Track::Failed { retry_at: Some(later) }),
            (key("b"), Track::Failed { retry_at: None }),
            (key("gone"), Track::Running),
        ]);
        assert_eq!(
            next_actions(&wanted, &tracks, &BTreeSet::new(), 4, now),
            vec![Action::Abort(key("gone"))]
        );
        assert_eq!(next_retry(&wanted, &tracks), Some(later));
        assert_eq!(
            next_actions(&wanted, &tracks, &BTreeSet::new(), 4, later),
            vec![Action::Abort(key("gone")), Action::Start(key("a"))]
        );
    }

    #[test]
    fn a_stopping_fill_holds_its_slot_and_its_generation() {
        let now = Instant::now();
        let wanted = vec![key("a"), key("b")];
        let stopping = BTreeSet::from([key("a")]);
        // "a" was stopped and wanted again: it waits for the old task to end
        // (same staging path, same reservation), and its slot is taken.
        assert_eq!(
            next_actions(&wanted, &BTreeMap::new(), &stopping, 2, now),
            vec![Action::Start(key("b"))]
        );
        assert_eq!(next_actions(&wanted, &BTreeMap::new(), &stopping, 1, now), vec![]);
    }

    #[test]
    fn a_slow_fill_does_not_block_the_next_one() {
        // Head-of-line: with two slots, a long fill in one namespace leaves
        // the other slot for another namespace's wrapper.
        let now = Instant::now();
        let slow = ("tenant-a".to_string(), "big".to_string(), "g".to_string());
        let fast = ("tenant-b".to_string(), "small".to_string(), "g".to_string());
        let tracks = BTreeMap::from([(slow.clone(), Track::Running)]);
        assert_eq!(
            next_actions(&[slow, fast.clone()], &tracks, &BTreeSet::new(), 2, now),
            vec![Action::Start(fast)]
        );
    }
}
