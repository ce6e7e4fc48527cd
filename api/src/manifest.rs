//! `manifest.json`: the description of one complete, verified generation.

use serde::{Deserialize, Serialize};

use crate::format::{FORMAT_V1, FORMAT_V2};
use crate::spec::Mode;

/// Written last into a generation; readers trust nothing without it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`FORMAT_V1`], or [`FORMAT_V2`] when a component is a directory
    /// (so loaders that read only v1 refuse it instead of misreading it).
    pub format: String,
    /// Namespace of the ModelWrapper.
    pub namespace: String,
    /// Name of the ModelWrapper.
    pub name: String,
    /// Generation digest (the directory name).
    pub generation: String,
    /// actor or task.
    pub mode: Mode,
    /// RFC 3339 time the generation was published.
    pub created: String,
    /// Sum of every file's bytes.
    pub total_bytes: u64,
    /// Whether the generation's tmpfs uses transparent huge pages.
    #[serde(default)]
    pub huge_pages: bool,
    /// Load-time hint from `memory.prefault`.
    #[serde(default)]
    pub prefault: bool,
    /// In pipeline order.
    pub components: Vec<ManifestComponent>,
    /// The pipeline object without its modules, when the spec gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_skeleton: Option<ManifestFile>,
}

/// One component of a generation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestComponent {
    /// Component name from the spec.
    pub name: String,
    /// The safetensors file (a `weights` component).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<ManifestWeights>,
    /// The component's directory (a `source` component, format v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<ManifestDirectory>,
    /// How to rebuild the module, if the spec says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeleton: Option<ManifestSkeleton>,
}

/// A fetched, verified file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestFile {
    /// File name inside the generation directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lowercase hex sha256 computed while filling.
    pub sha256: String,
    /// Where it came from.
    pub source: String,
}

/// The weights file plus what the header check found.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWeights {
    /// The file itself.
    #[serde(flatten)]
    pub file: ManifestFile,
    /// Number of tensors in the header.
    pub tensors: u64,
    /// Distinct dtypes, sorted.
    pub dtypes: Vec<String>,
    /// Byte offset in the file where tensor data starts (8 + header length).
    pub data_offset: u64,
}

/// A component filled as a directory of files (format v2).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestDirectory {
    /// The directory inside the generation (the component's name).
    pub path: String,
    /// What the source resolved to: the commit of an `hf://` revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The safetensors files that hold the component's weights, in order
    /// (paths relative to the generation): the shards that
    /// `model.safetensors.index.json` names, else every top-level
    /// `.safetensors` file of the directory.
    pub weights: Vec<String>,
    /// Every file, sorted by path.
    pub files: Vec<ManifestEntry>,
}

/// One file of a directory component.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestEntry {
    /// Path relative to the generation, size, sha256, origin.
    #[serde(flatten)]
    pub file: ManifestFile,
    /// What the header check found, for every `.safetensors` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safetensors: Option<SafetensorsSummary>,
}

/// The header facts of one checked safetensors file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SafetensorsSummary {
    /// Number of tensors.
    pub tensors: u64,
    /// Distinct dtypes, sorted.
    pub dtypes: Vec<String>,
    /// 8 + header length.
    pub data_offset: u64,
}

/// Module skeleton: a pickle in the generation or a factory reference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestSkeleton {
    /// The pickled meta-device module, when the skeleton is a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<ManifestFile>,
    /// `package.module:callable`, when the skeleton is a factory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factory: Option<String>,
    /// Keyword arguments for the factory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A manifest that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON or missing fields.
    #[error("manifest.json is not a valid zerocopy manifest: {0}")]
    Parse(#[from] serde_json::Error),
    /// Written by a newer or foreign format.
    #[error(
        "manifest.json has format {found:?}; this build reads {FORMAT_V1:?} and {FORMAT_V2:?}: upgrade the loader or refill the volume"
    )]
    Format {
        /// What the file says.
        found: String,
    },
}

impl Manifest {
    /// Parses and checks the format version.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_slice(bytes)?;
        if m.format != FORMAT_V1 && m.format != FORMAT_V2 {
            return Err(ManifestError::Format { found: m.format });
        }
        Ok(m)
    }

    /// Every file the generation holds, manifest excluded.
    pub fn files(&self) -> impl Iterator<Item = &ManifestFile> {
        self.components
            .iter()
            .flat_map(|c| {
                c.weights
                    .as_ref()
                    .map(|w| &w.file)
                    .into_iter()
                    .chain(c.directory.iter().flat_map(|d| d.files.iter().map(|e| &e.file)))
                    .chain(c.skeleton.as_ref().and_then(|s| s.file.as_ref()))
            })
            .chain(self.pipeline_skeleton.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_format() {
        let m = Manifest {
            format: FORMAT_V1.into(),
            namespace: "default".into(),
            name: "bert".into(),
            generation: "0123456789abcdef".into(),
            mode: Mode::Actor,
            created: "2026-01-01T00:00:00Z".into(),
            total_bytes: 10,
            huge_pages: false,
            prefault: false,
            components: vec![ManifestComponent {
                name: "enc".into(),
                weights: Some(ManifestWeights {
                    file: ManifestFile {
                        file: "enc.safetensors".into(),
                        bytes: 10,
                        sha256: "00".into(),
                        source: "file:///x".into(),
                    },
                    tensors: 1,
                    dtypes: vec!["F32".into()],
                    data_offset: 8,
                }),
                directory: None,
                skeleton: None,
            }],
            pipeline_skeleton: None,
        };
        let json = serde_json::to_vec(&m).unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains("\"dataOffset\":8") && text.contains("\"file\":\"enc.safetensors\""),
            "{text}"
        );
        assert_eq!(Manifest::from_json(&json).unwrap(), m);
        assert_eq!(m.files().count(), 1);
        let other = text.replace(FORMAT_V1, "zerocopy.dev/v9");
        assert!(Manifest::from_json(other.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("v9"));
    }
}
