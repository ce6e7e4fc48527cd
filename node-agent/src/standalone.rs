//! Standalone mode: the ModelWrapper YAML files given on the command line are
//! the desired state of this machine's shared memory.

use std::collections::BTreeSet;
use std::path::Path;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use zerocopy_api::format::generation_digest;
use zerocopy_api::quantity::HumanBytes;

use crate::error::FillError;
use crate::fill::{FillEngine, FillOutcome, ProgressFactory};
use crate::layout::{processes_using, GenerationEntry};
use crate::manifests::LoadedWrapper;
use crate::progress::Bars;

/// What happened to one wrapper.
#[derive(Debug)]
pub struct WrapperResult {
    /// `namespace/name`.
    pub wrapper: String,
    /// Generation wanted.
    pub generation: String,
    /// The fill's outcome.
    pub outcome: Result<FillOutcome, FillError>,
}

/// What happened to one old generation.
#[derive(Debug)]
pub struct GcResult {
    /// The generation.
    pub entry: GenerationEntry,
    /// Removed, or kept because processes use it (their pids).
    pub removed: Result<(), String>,
}

/// The whole reconcile.
#[derive(Debug, Default)]
pub struct Report {
    /// Leftovers of crashed fills removed at start.
    pub cleaned: usize,
    /// Per wrapper, in file order.
    pub wrappers: Vec<WrapperResult>,
    /// Superseded or pruned generations.
    pub gc: Vec<GcResult>,
}

impl Report {
    /// True when every wrapper is complete.
    pub fn all_ready(&self) -> bool {
        self.wrappers.iter().all(|w| w.outcome.is_ok())
    }
}

/// Options of one reconcile.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Show progress bars.
    pub progress: bool,
    /// Also remove generations of wrappers not in the files.
    pub prune: bool,
}

/// Fills every wrapper, then removes generations nothing wants or uses.
pub async fn reconcile(engine: &FillEngine, wrappers: &[LoadedWrapper], opts: Options) -> std::io::Result<Report> {
    let cleaned = engine.root().clean_leftovers()?;
    if cleaned > 0 {
        tracing::info!(count = cleaned, "removed leftovers of interrupted fills");
    }
    let mut report = fill_all(engine, wrappers, |id| -> Box<dyn ProgressFactory> {
        if opts.progress {
            Box::new(Bars::new(id))
        } else {
            Box::new(crate::fill::Quiet)
        }
    })
    .await;
    report.cleaned = cleaned;
    collect_garbage(engine, &mut report, opts.prune, |_| false)?;
    Ok(report)
}

/// Fills each wrapper in turn with the progress reporter `progress` makes.
pub async fn fill_all(
    engine: &FillEngine,
    wrappers: &[LoadedWrapper],
    progress: impl Fn(&str) -> Box<dyn ProgressFactory>,
) -> Report {
    let mut report = Report::default();
    for w in wrappers {
        let id = format!("{}/{}", w.namespace, w.name);
        let bars = progress(&id);
        let outcome = engine.fill(&w.namespace, &w.name, &w.wrapper.spec, bars.as_ref()).await;
        if let Err(e) = &outcome {
            tracing::error!(wrapper = %id, category = e.category(), error = %e, "fill failed");
        }
        report.wrappers.push(WrapperResult {
            wrapper: id,
            generation: generation_digest(&w.wrapper.spec),
            outcome,
        });
    }
    report
}

/// Removes superseded generations of the wrappers in `report` (and, with
/// `prune`, generations of wrappers not in it), except those `keep` protects
/// (CSI publications) and those processes on this machine still use.
pub fn collect_garbage(
    engine: &FillEngine,
    report: &mut Report,
    prune: bool,
    keep: impl Fn(&GenerationEntry) -> bool,
) -> std::io::Result<()> {
    let wanted: BTreeSet<(String, String, String)> = report
        .wrappers
        .iter()
        .filter_map(|r| {
            r.wrapper
                .split_once('/')
                .map(|(ns, n)| (ns.to_string(), n.to_string(), r.generation.clone()))
        })
        .collect();
    let given: BTreeSet<(String, String)> = wanted.iter().map(|(ns, n, _)| (ns.clone(), n.clone())).collect();
    for entry in engine.root().generations()? {
        // Python's from_model() frees its own generations (python -m modelwrapper gc).
        if entry.namespace == zerocopy_api::format::LOCAL_NAMESPACE {
            continue;
        }
        let key = (entry.namespace.clone(), entry.name.clone());
        let superseded =
            given.contains(&key) && !wanted.contains(&(key.0.clone(), key.1.clone(), entry.generation.clone()));
        if !(superseded || (prune && !given.contains(&key))) {
            continue;
        }
        // A wrapper whose new generation failed keeps its old one: it is what
        // running processes and the next reader still have.
        let failed = report
            .wrappers
            .iter()
            .any(|r| r.wrapper == format!("{}/{}", key.0, key.1) && r.outcome.is_err());
        if failed {
            continue;
        }
        if keep(&entry) {
            report.gc.push(GcResult {
                entry,
                removed: Err("mounted by a pod (CSI publication)".into()),
            });
            continue;
        }
        let users = processes_using(&entry.path);
        let removed = if users.is_empty() {
            engine.root().remove_generation(&entry).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "in use by pid {}",
                users.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            ))
        };
        report.gc.push(GcResult { entry, removed });
    }
    Ok(())
}

/// The summary table printed at the end.
pub fn summary_table(report: &Report, root: &Path) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "wrapper",
        "generation",
        "components",
        "size",
        "result",
        "time",
        "throughput",
    ]);
    for w in &report.wrappers {
        match &w.outcome {
            Ok(FillOutcome::UpToDate(m)) => {
                t.add_row([
                    w.wrapper.clone(),
                    w.generation.clone(),
                    m.components.len().to_string(),
                    HumanBytes(m.total_bytes).to_string(),
                    "up to date".into(),
                    "-".into(),
                    "-".into(),
                ]);
            }
            Ok(FillOutcome::Filled { manifest, seconds }) => {
                let rate = if *seconds > 0.0 {
                    format!("{}/s", HumanBytes((manifest.total_bytes as f64 / seconds) as u64))
                } else {
                    "-".into()
                };
                t.add_row([
                    w.wrapper.clone(),
                    w.generation.clone(),
                    manifest.components.len().to_string(),
                    HumanBytes(manifest.total_bytes).to_string(),
                    "filled".into(),
                    format!("{seconds:.2}s"),
                    rate,
                ]);
            }
            Err(e) => {
                t.add_row([
                    w.wrapper.clone(),
                    w.generation.clone(),
                    "-".into(),
                    "-".into(),
                    format!("FAILED ({})", e.category()),
                    "-".into(),
                    "-".into(),
                ]);
            }
        }
    }
    let mut out = t.to_string();
    for g in &report.gc {
        let what = format!(
            "{}/{} generation {}",
            g.entry.namespace, g.entry.name, g.entry.generation
        );
        match &g.removed {
            Ok(()) => out.push_str(&format!("\nremoved {what} (no longer wanted)")),
            Err(why) => out.push_str(&format!(
                "\nkept {what}: {why}; it is removed on a later run once unused"
            )),
        }
    }
    for w in &report.wrappers {
        if let Ok(o) = &w.outcome {
            out.push_str(&format!(
                "\n{}: {}",
                w.wrapper,
                root.join(&o.manifest().namespace)
                    .join(&o.manifest().name)
                    .join(&w.generation)
                    .display()
            ));
        }
    }
    out
}
