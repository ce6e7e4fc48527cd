//! Volume format v1: file names, the generation digest and the layout of a
//! node's volume root. `docs/FORMAT.md` is the prose version of this file.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::spec::{Mode, ModelWrapperSpec};

/// Value of `manifest.json`'s `format` field.
pub const FORMAT_V1: &str = "zerocopy.dev/v1";
/// The format of generations with a directory component (docs/FORMAT.md);
/// generations of single-file components keep [`FORMAT_V1`], so pods with
/// older loaders keep reading them.
pub const FORMAT_V2: &str = "zerocopy.dev/v2";
/// Written last: its presence means the generation is complete and verified.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Directory under the volume root holding fills in progress.
pub const STAGING_DIR: &str = ".staging";
/// Lock file under the volume root: one agent (or standalone run) at a time.
pub const LOCK_FILE: &str = ".lock";
/// Namespace of generations that Python's `ModelWrapper.from_model()`
/// publishes itself on one machine; the agent never prunes or cleans them.
pub const LOCAL_NAMESPACE: &str = "local";
/// `<namespace>/<wrapper>/current`: a relative symlink to the newest Ready
/// generation of the wrapper on this node.
pub const CURRENT_LINK: &str = "current";
/// `<namespace>/.node.json`: what a pod mounting the namespace catalog needs
/// to know about its node's agent (node name, upload endpoint).
pub const NODE_INFO_FILE: &str = ".node.json";
/// File holding the pipeline object without its modules.
pub const PIPELINE_SKELETON_FILE: &str = "pipeline.skeleton.pkl";
/// Hex characters of the generation digest kept in directory names.
pub const GENERATION_LEN: usize = 16;

/// `<component>.safetensors`
pub fn weights_file(component: &str) -> String {
    format!("{component}.safetensors")
}

/// `<component>.skeleton.pt`
pub fn skeleton_file(component: &str) -> String {
    format!("{component}.skeleton.pt")
}

/// What the generation digest covers: everything that changes the bytes or
/// layout of the volume. `memory.prefault` is a load-time hint and the node
/// selector is placement, so neither is included.
#[derive(Serialize)]
struct GenerationInput<'a> {
    format: &'static str,
    mode: Mode,
    huge_pages: bool,
    components: Vec<ComponentInput<'a>>,
    pipeline_skeleton: Option<(&'a str, Option<&'a str>)>,
}

#[derive(Serialize)]
struct ComponentInput<'a> {
    name: &'a str,
    weights: Option<(&'a str, Option<&'a str>)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a crate::spec::DirectorySourceSpec>,
    skeleton_uri: Option<(&'a str, Option<&'a str>)>,
    factory: Option<&'a str>,
    kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// Short digest of the resolved sources: a spec change that changes what is
/// filled yields a new generation beside the old one. Sha256 values are
/// lower-cased first so `ABC…` and `abc…` name the same generation.
pub fn generation_digest(spec: &ModelWrapperSpec) -> String {
    let lower = |s: &Option<String>| s.as_ref().map(|v| v.to_ascii_lowercase());
    let shas: Vec<(Option<String>, Option<String>)> = spec
        .pipeline
        .components
        .iter()
        .map(|c| {
            (
                c.weights.as_ref().and_then(|w| lower(&w.sha256)),
                c.skeleton.as_ref().and_then(|s| lower(&s.sha256)),
            )
        })
        .collect();
    let pipeline_sha = spec.pipeline.skeleton.as_ref().and_then(|s| lower(&s.sha256));
    let input = GenerationInput {
        format: FORMAT_V1,
        mode: spec.mode,
        huge_pages: spec.memory.huge_pages,
        components: spec
            .pipeline
            .components
            .iter()
            .zip(&shas)
            .map(|(c, (w, s))| ComponentInput {
                name: &c.name,
                weights: c.weights.as_ref().map(|weights| (weights.uri.as_str(), w.as_deref())),
                source: c.source.as_ref(),
                skeleton_uri: c
                    .skeleton
                    .as_ref()
                    .and_then(|sk| sk.uri.as_deref().map(|u| (u, s.as_deref()))),
                factory: c.skeleton.as_ref().and_then(|sk| sk.factory.as_deref()),
                kwargs: c.skeleton.as_ref().and_then(|sk| sk.kwargs.as_ref()),
            })
            .collect(),
        pipeline_skeleton: spec
            .pipeline
            .skeleton
            .as_ref()
            .map(|s| (s.uri.as_str(), pipeline_sha.as_deref())),
    };
    // serde_json writes struct fields in declaration order and maps sorted
    // (serde_json::Map is a BTreeMap here), so the encoding is canonical.
    let canonical = serde_json::to_vec(&input).unwrap_or_default();
    let mut hex = hex::encode(Sha256::digest(&canonical));
    hex.truncate(GENERATION_LEN);
    hex
}

/// True for a directory name that can be a generation.
pub fn is_generation_name(s: &str) -> bool {
    s.len() == GENERATION_LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ModelWrapperSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn generation_is_stable_and_short() {
        let a = spec("pipeline: {components: [{name: m, weights: {uri: 'file:///m'}}]}");
        let g = generation_digest(&a);
        assert_eq!(g.len(), GENERATION_LEN);
        assert!(is_generation_name(&g));
        assert_eq!(g, generation_digest(&a.clone()));
    }

    #[test]
    fn what_changes_the_bytes_changes_the_generation() {
        let base = "pipeline: {components: [{name: m, weights: {uri: 'file:///m', sha256: 'aa'}}]}";
        let g = generation_digest(&spec(base));
        assert_ne!(g, generation_digest(&spec(&base.replace("aa", "bb"))));
        assert_ne!(g, generation_digest(&spec(&base.replace("file:///m", "file:///n"))));
        assert_ne!(
            g,
            generation_digest(&spec(&format!("memory: {{hugePages: true}}\n{base}")))
        );
        assert_eq!(g, generation_digest(&spec(&base.replace("aa", "AA"))));
        // placement and load hints do not refill
        assert_eq!(
            g,
            generation_digest(&spec(&format!(
                "nodeSelector: {{a: b}}\nmemory: {{prefault: true}}\n{base}"
            )))
        );
    }
}
