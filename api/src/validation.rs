//! Spec validation that reports every problem at once, each with the field
//! path and what to do, so a user fixes a YAML file in one pass.

use std::collections::BTreeSet;
use std::fmt;

use crate::source::{is_safe_relative_path, DirectorySource};
use crate::spec::{DirectorySourceSpec, Mode, ModelWrapperSpec, SourceSpec};

/// URI schemes the fill engine can read today.
pub const SUPPORTED_SCHEMES: [&str; 4] = ["file", "http", "https", "upload"];
/// `uri: "upload:"`: the bytes are uploaded to a node agent by
/// `ModelWrapper.from_model()` in a pod and spread between agents; always
/// pinned by sha256, whatever the pinning mode.
pub const UPLOAD_URI: &str = "upload:";
/// Schemes a `source:` (directory) component reads; a single `weights:`
/// file from them is pointed there.
const DIRECTORY_SCHEMES: [&str; 5] = ["s3", "hf", "oci", "az", "gs"];

/// Whether every source must carry a sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    /// Standalone: the machine's user wrote the YAML; sha256 is checked when given.
    Optional,
    /// Cluster: every source (weights and skeletons) needs a sha256, since a
    /// skeleton is a pickle that runs code in every pod that loads it and
    /// weights must be the bytes the author meant.
    Required,
}

/// One problem at one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path in the object, e.g. `spec.pipeline.components[1].name`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Every problem found in one object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidationErrors {
    /// `namespace/name` of the object, for messages.
    pub object: String,
    /// The problems, in field order.
    pub errors: Vec<FieldError>,
}

impl ValidationErrors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ModelWrapper {} is invalid ({} problem{}):",
            self.object,
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  - {}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// True for a DNS-1123 label: 1-63 chars of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// True for a DNS-1123 subdomain (object names): labels joined by dots, at most 253 chars.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// True for 64 lowercase or uppercase hex characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Validates a wrapper's name, namespace and spec, collecting every problem.
pub fn validate_wrapper(
    namespace: &str,
    name: &str,
    spec: &ModelWrapperSpec,
    pinning: Pinning,
) -> Result<(), ValidationErrors> {
    let mut errs = match validate_sources(namespace, name, spec, pinning) {
        Ok(()) => ValidationErrors {
            object: format!("{namespace}/{name}"),
            errors: Vec::new(),
        },
        Err(e) => e,
    };
    match (spec.mode, &spec.task) {
        (Mode::Task, None) => errs.push(
            "spec.task",
            "mode task needs spec.task.template: the pod that runs each task",
        ),
        (Mode::Actor, Some(_)) => errs.push(
            "spec.task",
            "spec.task is only used in mode task; set mode: task or remove it",
        ),
        _ => {}
    }
    if errs.errors.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// The part of [`validate_wrapper`] that concerns what is filled on a node
/// (names, sources, digests); a node agent filling a ModelReplica checks only
/// this, since the replica carries no task template.
pub fn validate_sources(
    namespace: &str,
    name: &str,
    spec: &ModelWrapperSpec,
    pinning: Pinning,
) -> Result<(), ValidationErrors> {
    let mut errs = ValidationErrors {
        object: format!("{namespace}/{name}"),
        errors: Vec::new(),
    };
    if !is_dns1123_label(namespace) {
        errs.push(
            "metadata.namespace",
            format!("{namespace:?} is not a DNS-1123 label (lowercase letters, digits and '-', at most 63)"),
        );
    }
    if !is_dns1123_subdomain(name) {
        errs.push(
            "metadata.name",
            format!("{name:?} is not a DNS-1123 name (lowercase letters, digits, '-' and '.', at most 253)"),
        );
    }

    let components = &spec.pipeline.components;
    if components.is_empty() {
        errs.push("spec.pipeline.components", "at least one component is required");
    }
    let mut seen = BTreeSet::new();
    for (i, c) in components.iter().enumerate() {
        let at = format!("spec.pipeline.components[{i}]");
        if !is_dns1123_label(&c.name) {
            errs.push(
                format!("{at}.name"),
                format!("{:?} is not a DNS-1123 label: use lowercase letters, digits and '-', at most 63 characters (it becomes a file name)", c.name),
            );
        } else if c.name == "pipeline" {
            errs.push(
                format!("{at}.name"),
                "\"pipeline\" is reserved for the pipeline skeleton file; rename the component",
            );
        } else if !seen.insert(c.name.as_str()) {
            errs.push(
                format!("{at}.name"),
                format!("duplicate component name {:?}: names must be unique", c.name),
            );
        }
        match (&c.weights, &c.source) {
            (Some(weights), None) => check_source(&mut errs, &format!("{at}.weights"), weights, pinning),
            (None, Some(source)) => check_directory_source(&mut errs, &format!("{at}.source"), source, pinning),
            (Some(_), Some(_)) => errs.push(
                at.clone(),
                "set either weights (one safetensors file) or source (a repository or directory of files), not both",
            ),
            (None, None) => errs.push(
                at.clone(),
                "set weights: {uri: ...} (one safetensors file) or source: {uri: hf://org/repo@commit} (a repository or directory of files)",
            ),
        }
        if let Some(sk) = &c.skeleton {
            let at = format!("{at}.skeleton");
            match (&sk.uri, &sk.factory) {
                (Some(uri), None) => check_source(
                    &mut errs,
                    &at,
                    &SourceSpec {
                        uri: uri.clone(),
                        sha256: sk.sha256.clone(),
                    },
                    pinning,
                ),
                (None, Some(factory)) => {
                    if !is_factory_ref(factory) {
                        errs.push(
                            format!("{at}.factory"),
                            format!("{factory:?} is not a factory reference: write \"package.module:callable\""),
                        );
                    }
                    if sk.sha256.is_some() {
                        errs.push(
                            format!("{at}.sha256"),
                            "sha256 applies to a skeleton uri, not to a factory; remove it",
                        );
                    }
                }
                (Some(_), Some(_)) => errs.push(
                    at.clone(),
                    "set either uri (a pickled meta-device module) or factory, not both",
                ),
                (None, None) => errs.push(
                    at.clone(),
                    "set uri (a pickled meta-device module) or factory (\"package.module:callable\")",
                ),
            }
            if sk.kwargs.is_some() && sk.factory.is_none() {
                errs.push(format!("{at}.kwargs"), "kwargs apply only to a factory skeleton");
            }
        }
    }
    if let Some(sk) = &spec.pipeline.skeleton {
        check_source(&mut errs, "spec.pipeline.skeleton", sk, pinning);
    }
    if errs.errors.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

fn check_source(errs: &mut ValidationErrors, at: &str, source: &SourceSpec, pinning: Pinning) {
    match url::Url::parse(&source.uri) {
        Err(e) => errs.push(
            format!("{at}.uri"),
            format!(
                "{:?} is not a URI ({e}); write file:///abs/path or https://host/path",
                source.uri
            ),
        ),
        Ok(u) if DIRECTORY_SCHEMES.contains(&u.scheme()) => errs.push(
            format!("{at}.uri"),
            format!(
                "one weights file from {scheme}:// is not supported yet (weights: takes file, http and https); declare the component with source: {{uri: '{scheme}://…', include: ['<file>.safetensors']}} instead (docs/FORMAT.md, \"Directory components\")",
                scheme = u.scheme()
            ),
        ),
        Ok(u) if !SUPPORTED_SCHEMES.contains(&u.scheme()) => errs.push(
            format!("{at}.uri"),
            format!(
                "scheme {}:// is not supported; supported: file, http, https (and upload: for from_model)",
                u.scheme()
            ),
        ),
        Ok(u) if u.scheme() == "upload" && source.uri != UPLOAD_URI => errs.push(
            format!("{at}.uri"),
            format!("{:?}: an uploaded source is written exactly {UPLOAD_URI:?}", source.uri),
        ),
        Ok(u) if u.scheme() == "file" && (u.host_str().is_some_and(|h| !h.is_empty() && h != "localhost")) => errs
            .push(
                format!("{at}.uri"),
                format!(
                    "{:?} names host {:?}; a file URI needs an absolute path: file:///path",
                    source.uri,
                    u.host_str().unwrap_or_default()
                ),
            ),
        Ok(_) => {}
    }
    match &source.sha256 {
        Some(sha) if !is_sha256_hex(sha) => errs.push(
            format!("{at}.sha256"),
            format!("{sha:?} is not a sha256: expected 64 hex characters (sha256sum prints it)"),
        ),
        None if source.uri == UPLOAD_URI => errs.push(
            format!("{at}.sha256"),
            "an uploaded source needs its sha256: agents accept only bytes with this digest",
        ),
        None if pinning == Pinning::Required => errs.push(
            format!("{at}.sha256"),
            "a sha256 is required in a cluster: every pod that loads the volume trusts these bytes (a skeleton is a pickle that runs code); add the file's sha256 (sha256sum prints it)",
        ),
        _ => {}
    }
}

fn check_directory_source(errs: &mut ValidationErrors, at: &str, source: &DirectorySourceSpec, pinning: Pinning) {
    match DirectorySource::parse(&source.uri) {
        Err(message) => errs.push(format!("{at}.uri"), message),
        Ok(DirectorySource::HuggingFace { revision, .. }) => {
            let pinned = revision.as_deref().is_some_and(crate::source::is_commit);
            if pinning == Pinning::Required && !pinned {
                errs.push(
                    format!("{at}.uri"),
                    format!(
                        "{:?} names no commit: in a cluster a repository is pinned by its 40-hex commit (hf://org/repo@<commit>; `huggingface-cli repo-info` or the Hub's \"Files\" page shows it), so every node fills the same bytes",
                        source.uri
                    ),
                );
            }
        }
        Ok(DirectorySource::Oci { reference, .. }) => {
            if pinning == Pinning::Required && !reference.starts_with("sha256:") {
                errs.push(
                    format!("{at}.uri"),
                    format!(
                        "{:?} names a tag: in a cluster an artifact is pinned by its manifest digest (oci://registry/repo@sha256:…; `oras manifest fetch --descriptor` prints it), so every node fills the same bytes",
                        source.uri
                    ),
                );
            }
        }
        Ok(
            parsed @ (DirectorySource::Directory { .. }
            | DirectorySource::S3 { .. }
            | DirectorySource::Gcs { .. }
            | DirectorySource::Azure { .. }),
        ) => {
            if pinning == Pinning::Required && source.sha256.is_empty() {
                // The bucket could serve other bytes, with their own
                // checksum, to the next node: only the spec pins content.
                let s3_note = match parsed {
                    DirectorySource::S3 { .. } => "; S3's own ChecksumSHA256 is not a pin: it comes from the bucket, which may serve other bytes to the next node",
                    _ => "",
                };
                errs.push(
                    format!("{at}.sha256"),
                    format!("this source in a cluster needs pins: the sha256 of every file it takes (path: sha256), or of a SHA256SUMS file in it that lists them{s3_note}"),
                );
            }
        }
    }
    let mut globs_ok = true;
    for (kind, globs) in [("include", &source.include), ("exclude", &source.exclude)] {
        for (j, g) in globs.iter().enumerate() {
            if let Err(e) = crate::source::glob(g) {
                globs_ok = false;
                errs.push(format!("{at}.{kind}[{j}]"), format!("{g:?} is not a glob: {e}"));
            }
        }
    }
    if globs_ok {
        if let Err(e) = crate::source::Selection::new(&source.include, &source.exclude) {
            errs.push(format!("{at}.include"), e);
        }
    }
    if let Some(region) = &source.region {
        let ok = !region.is_empty()
            && region.len() <= 32
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            errs.push(
                format!("{at}.region"),
                format!("{region:?} is not a region name (e.g. us-east-1)"),
            );
        }
    }
    for (path, sha) in &source.sha256 {
        if !is_safe_relative_path(path) {
            errs.push(
                format!("{at}.sha256[{path:?}]"),
                "not a relative path inside the source (no leading '/', no '.' or '..' parts, no hidden files)",
            );
        }
        if !is_sha256_hex(sha) {
            errs.push(
                format!("{at}.sha256[{path:?}]"),
                format!("{sha:?} is not a sha256: expected 64 hex characters (sha256sum prints it)"),
            );
        }
    }
    if let Some(endpoint) = &source.endpoint {
        match url::Url::parse(endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            _ => errs.push(
                format!("{at}.endpoint"),
                format!("{endpoint:?} is not an http(s) address; write e.g. https://hf-mirror.example.com"),
            ),
        }
    }
    if let Some(secret) = &source.secret_ref {
        if !is_dns1123_subdomain(&secret.name) {
            errs.push(
                format!("{at}.secretRef.name"),
                format!("{:?} is not a Secret name", secret.name),
            );
        }
    }
}

fn is_factory_ref(s: &str) -> bool {
    let Some((module, attr)) = s.split_once(':') else {
        return false;
    };
    let ident = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit())
    };
    module.split('.').all(ident) && attr.split('.').all(ident)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ModelWrapperSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn source_errors(source: &str, pinning: Pinning) -> Vec<String> {
        let s = spec(&format!("pipeline: {{components: [{{name: m, source: {source}}}]}}"));
        match validate_sources("ns", "w", &s, pinning) {
            Ok(()) => Vec::new(),
            Err(e) => e
                .errors
                .into_iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect(),
        }
    }

    #[test]
    fn directory_sources_must_be_pinned_in_a_cluster() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let digest = format!("sha256:{}", "ab".repeat(32));
        let sha = "cd".repeat(32);
        // Content-addressed or pinned: fine in a cluster.
        for ok in [
            format!("{{uri: 'hf://org/repo@{commit}'}}"),
            format!("{{uri: 'oci://ghcr.io/org/model@{digest}'}}"),
            format!("{{uri: 's3://bucket/prefix/', sha256: {{SHA256SUMS: {sha}}}}}"),
            format!("{{uri: 'file:///models/m/', sha256: {{model.safetensors: {sha}}}}}"),
        ] {
            assert_eq!(source_errors(&ok, Pinning::Required), Vec::<String>::new(), "{ok}");
        }
        // Moving or unpinned: fine standalone, refused in a cluster, saying how to pin.
        for (moving, says) in [
            ("{uri: 'hf://org/repo@main'}", "40-hex commit"),
            ("{uri: 'hf://org/repo'}", "40-hex commit"),
            ("{uri: 'oci://ghcr.io/org/model:v1'}", "manifest digest"),
            ("{uri: 's3://bucket/prefix/'}", "SHA256SUMS"),
            ("{uri: 's3://bucket/prefix/'}", "ChecksumSHA256 is not a pin"),
            ("{uri: 'file:///models/m/'}", "sha256 of every file"),
        ] {
            assert_eq!(
                source_errors(moving, Pinning::Optional),
                Vec::<String>::new(),
                "{moving}"
            );
            let errs = source_errors(moving, Pinning::Required);
            assert!(errs.len() == 1 && errs[0].contains(says), "{moving}: {errs:?}");
        }
    }

    #[test]
    fn directory_sources_report_every_problem() {
        let errs = source_errors(
            "{uri: 'gs://b/p/', include: ['a[b'], sha256: {'../x': 'zz'}, endpoint: 'ftp://x', secretRef: {name: 'Bad_Name'}}",
            Pinning::Optional,
        );
        let text = errs.join("\n");
        for needle in [
            ".uri: \"gs://b/p/\" does not name a Cloud Storage bucket",
            ".include[0]",
            "not a relative path",
            "is not a sha256",
            ".endpoint",
            ".secretRef.name",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
        let both = spec("pipeline: {components: [{name: m, weights: {uri: 'file:///m'}, source: {uri: 'hf://o/r'}}]}");
        let e = validate_sources("ns", "w", &both, Pinning::Optional).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let neither = spec("pipeline: {components: [{name: m}]}");
        let e = validate_sources("ns", "w", &neither, Pinning::Optional).unwrap_err();
        assert!(e.to_string().contains("set weights"), "{e}");
    }

    #[test]
    fn a_good_spec_passes() {
        let s = spec(&format!(
            "pipeline: {{components: [{{name: encoder, weights: {{uri: 'https://h/e.safetensors', sha256: '{}'}}, skeleton: {{factory: 'pkg.mod:Enc', kwargs: {{h: 1}}}}}}, {{name: dec, weights: {{uri: 'file:///m/d.safetensors'}}}}]}}",
            "a".repeat(64)
        ));
        validate_wrapper("default", "bert", &s, Pinning::Optional).unwrap();
        let e = validate_wrapper("default", "bert", &s, Pinning::Required).unwrap_err();
        assert_eq!(e.errors.len(), 1, "{e}");
        assert_eq!(e.errors[0].field, "spec.pipeline.components[1].weights.sha256");
        assert!(e.errors[0].message.contains("required in a cluster"), "{e}");
    }

    #[test]
    fn a_cluster_needs_every_source_pinned() {
        let s = spec(
            "pipeline: {components: [{name: a, weights: {uri: 'https://h/a'}, skeleton: {uri: 'https://h/a.pt'}}], skeleton: {uri: 'https://h/p.pkl'}}",
        );
        let e = validate_sources("default", "m", &s, Pinning::Required).unwrap_err();
        let fields: Vec<&str> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.pipeline.components[0].weights.sha256",
                "spec.pipeline.components[0].skeleton.sha256",
                "spec.pipeline.skeleton.sha256"
            ]
        );
        validate_sources("default", "m", &s, Pinning::Optional).unwrap();
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let s = spec(
            "mode: task\npipeline: {components: [{name: ../x, weights: {uri: 'ftp://h/x', sha256: 'abc'}}, {name: a, weights: {uri: 'not a uri'}}, {name: a, weights: {uri: 's3://b/k'}}, {name: b, weights: {uri: 'file:///b'}, skeleton: {}}]}",
        );
        let e = validate_wrapper("default", "Bad_Name", &s, Pinning::Optional).unwrap_err();
        let fields: Vec<&str> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "metadata.name",
                "spec.pipeline.components[0].name",
                "spec.pipeline.components[0].weights.uri",
                "spec.pipeline.components[0].weights.sha256",
                "spec.pipeline.components[1].weights.uri",
                "spec.pipeline.components[2].name",
                "spec.pipeline.components[2].weights.uri",
                "spec.pipeline.components[3].skeleton",
                "spec.task",
            ]
        );
        let text = e.to_string();
        assert!(text.contains("duplicate component name \"a\""), "{text}");
        assert!(text.contains("not supported yet"), "{text}");
        assert!(text.contains("64 hex"), "{text}");
        assert!(text.contains("default/Bad_Name"), "{text}");
    }

    #[test]
    fn empty_pipeline_and_file_host_are_rejected() {
        let e = validate_wrapper("default", "m", &spec("pipeline: {components: []}"), Pinning::Optional).unwrap_err();
        assert_eq!(e.errors[0].field, "spec.pipeline.components");
        let e = validate_wrapper(
            "default",
            "m",
            &spec("pipeline: {components: [{name: m, weights: {uri: 'file://models/m'}}]}"),
            Pinning::Optional,
        )
        .unwrap_err();
        assert!(e.errors[0].message.contains("file:///path"), "{e}");
    }

    #[test]
    fn dns_rules() {
        assert!(is_dns1123_label("encoder-2"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain("bert.v2"));
        assert!(!is_dns1123_subdomain(".."));
    }
}
