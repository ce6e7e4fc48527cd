//! `zerocopy-node-agent status`: what the volume root holds.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde::Serialize;
use zerocopy_api::quantity::HumanBytes;

use crate::layout::{processes_using, VolumeRoot};

/// One generation as `status` reports it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationStatus {
    /// Namespace.
    pub namespace: String,
    /// Wrapper name.
    pub name: String,
    /// Generation digest.
    pub generation: String,
    /// `Ready` or `Incomplete`.
    pub state: &'static str,
    /// Bytes of the generation.
    pub bytes: u64,
    /// Components.
    pub components: Vec<String>,
    /// Publish time.
    pub created: Option<String>,
    /// `tmpfs` (own mount) or `directory`.
    pub backing: &'static str,
    /// Processes on this machine mapping or holding its files.
    pub processes: Vec<u32>,
    /// Path.
    pub path: String,
}

/// Collects the status of every generation.
pub fn collect(root: &VolumeRoot) -> std::io::Result<Vec<GenerationStatus>> {
    Ok(root
        .generations()?
        .into_iter()
        .map(|g| GenerationStatus {
            state: if g.manifest.is_some() { "Ready" } else { "Incomplete" },
            bytes: g.manifest.as_ref().map_or(0, |m| m.total_bytes),
            components: g
                .manifest
                .as_ref()
                .map(|m| m.components.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default(),
            created: g.manifest.as_ref().map(|m| m.created.clone()),
            backing: if g.mounted { "tmpfs" } else { "directory" },
            processes: processes_using(&g.path),
            path: g.path.display().to_string(),
            namespace: g.namespace,
            name: g.name,
            generation: g.generation,
        })
        .collect())
}

/// Renders the status as a table.
pub fn table(rows: &[GenerationStatus]) -> String {
    if rows.is_empty() {
        return "no generations under this root".into();
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "wrapper",
        "generation",
        "state",
        "size",
        "components",
        "backing",
        "processes",
        "created",
    ]);
    for r in rows {
        t.add_row([
            format!("{}/{}", r.namespace, r.name),
            r.generation.clone(),
            r.state.to_string(),
            HumanBytes(r.bytes).to_string(),
            r.components.join(","),
            r.backing.to_string(),
            r.processes.len().to_string(),
            r.created.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let total: u64 = rows.iter().map(|r| r.bytes).sum();
    format!("{t}\ntotal resident: {}", HumanBytes(total))
}
