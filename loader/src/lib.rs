//! `load()` for Rust: a zerocopy model volume mapped into memory, tensors as
//! views of that mapping. With the `tch` feature, tensors are
//! `tch::Tensor::from_blob` over the mapping and can be bound into a
//! `tch::nn::VarStore` without copying.
//!
//! The mapping is private and read-only (`MAP_PRIVATE`, `PROT_READ`): every
//! process shares the tmpfs pages, and a stray write faults instead of
//! corrupting the node's copy. Copy a tensor before modifying it in place.

#![allow(unsafe_code)] // memory mapping; each block has a SAFETY comment

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use zerocopy_api::manifest::{Manifest, ManifestError};
use zerocopy_api::safetensors::{check_header_len, header_len, validate_header, Header, HeaderError, TensorInfo};

#[cfg(feature = "tch")]
mod device;
#[cfg(feature = "tch")]
mod torch;
#[cfg(feature = "tch")]
pub use torch::{BindError, Binding};

/// Safetensors `__metadata__` key holding the Python attribute name.
pub const ATTRIBUTE_KEY: &str = "zerocopy.attribute";
/// File of a directory component holding the Python attribute name when the
/// component name does not give it back (`{"attribute": "textEncoder"}`;
/// `save_pretrained` writes the shards, so their metadata cannot say it).
pub const ATTRIBUTE_FILE: &str = "zerocopy-attribute.json";

/// Why a volume could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be opened or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// No manifest, or not one this build reads.
    #[error("{}: {source}; is this a complete zerocopy volume?", path.display())]
    Manifest {
        /// The volume.
        path: PathBuf,
        /// What is wrong.
        source: ManifestError,
    },
    /// A weights file breaks the format.
    #[error("component {component}: {source}")]
    Header {
        /// Component.
        component: String,
        /// The rule.
        source: HeaderError,
    },
    /// The manifest lists no weights file for a component.
    #[error("component {0}: the manifest lists no weights file; the volume is damaged, refill it")]
    NoWeights(String),
    /// Two shards of one component hold the same tensor.
    #[error("component {component}: tensor {name} is in both {first} and {second}; a component's shards must hold distinct tensors (read per-rank files one at a time through Component::shards)")]
    DuplicateTensor {
        /// Component.
        component: String,
        /// Tensor name.
        name: String,
        /// First file holding it.
        first: String,
        /// Second file holding it.
        second: String,
    },
    /// The file on disk is not the one the manifest describes.
    #[error("component {component}: {file} is {actual} bytes but the manifest says {expected}; the volume is damaged, refill it")]
    SizeMismatch {
        /// Component.
        component: String,
        /// File name.
        file: String,
        /// From the manifest.
        expected: u64,
        /// On disk.
        actual: u64,
    },
}

/// A loaded volume: every component mapped once.
#[derive(Debug)]
pub struct Pipeline {
    path: PathBuf,
    manifest: Manifest,
    components: Vec<Component>,
}

/// One component's weights: its safetensors file (format v1) or the shards
/// of a directory component (format v2), each mapped once.
#[derive(Debug)]
pub struct Component {
    name: String,
    shards: Vec<Shard>,
    /// From a directory component's [`ATTRIBUTE_FILE`].
    attribute: Option<String>,
}

/// One mapped safetensors file. The mapping is reference-counted: tch
/// tensors made from it hold a reference in their storage, so it stays mapped
/// until the last tensor (or view of one) is gone, whatever safe code does.
#[derive(Debug)]
pub struct Shard {
    file: String,
    map: Arc<Mmap>,
    header: Header,
}

/// A tensor as bytes inside the mapping.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// Name, dtype, shape, offsets.
    pub info: &'a TensorInfo,
    /// The tensor's bytes, borrowed from the mapping.
    pub data: &'a [u8],
    /// The mapping the bytes belong to.
    #[cfg_attr(not(feature = "tch"), allow(dead_code))]
    pub(crate) map: &'a Arc<Mmap>,
}

/// Maps the volume at `path` (a generation directory or a CSI mount).
pub fn load(path: impl AsRef<Path>) -> Result<Pipeline, LoadError> {
    let path = path.as_ref();
    let manifest_path = path.join(zerocopy_api::format::MANIFEST_FILE);
    let bytes = std::fs::read(&manifest_path).map_err(|source| LoadError::Io {
        path: manifest_path.clone(),
        source,
    })?;
    let manifest = Manifest::from_json(&bytes).map_err(|source| LoadError::Manifest {
        path: path.to_path_buf(),
        source,
    })?;
    let components = manifest
        .components
        .iter()
        .map(|c| map_component(path, c))
        .collect::<Result<_, _>>()?;
    Ok(Pipeline {
        path: path.to_path_buf(),
        manifest,
        components,
    })
}

/// The attribute a directory component's `zerocopy-attribute.json` names,
/// when the manifest lists the file and it holds a Python identifier.
fn attribute_file(dir: &Path, path: &str, files: &[zerocopy_api::manifest::ManifestEntry]) -> Option<String> {
    let name = format!("{path}/{ATTRIBUTE_FILE}");
    let entry = files.iter().find(|e| e.file.file == name)?;
    if entry.file.bytes > 4096 {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(&name)).ok()?).ok()?;
    let attribute = value.get("attribute")?.as_str()?;
    let identifier = attribute
        .chars()
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && attribute.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
    identifier.then(|| attribute.to_string())
}

/// Maps a component's weights: its one file, or every shard a directory
/// component lists (a tensor name in two shards is refused: per-rank files
/// are read one at a time with [`Shard`]s of their own, not merged).
fn map_component(dir: &Path, c: &zerocopy_api::manifest::ManifestComponent) -> Result<Component, LoadError> {
    let mut files: Vec<(&str, u64)> = Vec::new();
    if let Some(w) = &c.weights {
        files.push((&w.file.file, w.file.bytes));
    }
    if let Some(d) = &c.directory {
        for w in &d.weights {
            let bytes = d.files.iter().find(|e| &e.file.file == w).map(|e| e.file.bytes);
            files.push((w, bytes.unwrap_or(u64::MAX)));
        }
    }
    if files.is_empty() {
        return Err(LoadError::NoWeights(c.name.clone()));
    }
    let shards = files
        .into_iter()
        .map(|(file, bytes)| map_shard(dir, &c.name, file, bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::BTreeMap::new();
    for s in &shards {
        for t in &s.header.tensors {
            if let Some(first) = seen.insert(t.name.as_str(), s.file.as_str()) {
                return Err(LoadError::DuplicateTensor {
                    component: c.name.clone(),
                    name: t.name.clone(),
                    first: first.into(),
                    second: s.file.clone(),
                });
            }
        }
    }
    let attribute = c
        .directory
        .as_ref()
        .and_then(|d| attribute_file(dir, &d.path, &d.files));
    Ok(Component {
        name: c.name.clone(),
        shards,
        attribute,
    })
}

fn map_shard(dir: &Path, name: &str, file: &str, expected: u64) -> Result<Shard, LoadError> {
    let path = dir.join(file);
    let io = |source| LoadError::Io {
        path: path.clone(),
        source,
    };
    let f = File::open(&path).map_err(io)?;
    let actual = f.metadata().map_err(io)?.len();
    if actual != expected {
        return Err(LoadError::SizeMismatch {
            component: name.into(),
            file: file.into(),
            expected,
            actual,
        });
    }
    // SAFETY: a private read-only mapping of a file in a published
    // generation. Generations are immutable once their manifest exists (the
    // agent writes nothing into them and publishes read-only), so the bytes
    // behind the returned slices do not change while the map is alive.
    let map = unsafe { MmapOptions::new().map_copy_read_only(&f) }.map_err(io)?;
    let header_err = |source| LoadError::Header {
        component: name.into(),
        source,
    };
    let prefix: [u8; 8] = map.get(..8).and_then(|s| s.try_into().ok()).ok_or(LoadError::Header {
        component: name.into(),
        source: HeaderError::TooShort(actual),
    })?;
    let n = header_len(&prefix);
    check_header_len(n, actual).map_err(header_err)?;
    let header = validate_header(&map[8..8 + n as usize], actual).map_err(header_err)?;
    Ok(Shard {
        file: file.into(),
        map: Arc::new(map),
        header,
    })
}

impl Pipeline {
    /// The volume directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Components in pipeline order.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// A component by name.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}

impl Component {
    /// Component name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Python attribute this component came from, when recorded: in
    /// its weights' metadata, or a directory component's attribute file.
    pub fn attribute(&self) -> Option<&str> {
        self.shards
            .first()
            .and_then(|s| s.header.metadata.get(ATTRIBUTE_KEY))
            .or(self.attribute.as_ref())
            .map(String::as_str)
    }

    /// The parsed header of the first (for format v1 the only) file.
    pub fn header(&self) -> &Header {
        // map_component never builds a component without a shard.
        &self.shards[0].header
    }

    /// The mapped files, in manifest order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Every tensor, shard by shard in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.shards.iter().flat_map(|s| s.tensors())
    }

    /// One tensor by name.
    pub fn tensor_view(&self, name: &str) -> Option<TensorView<'_>> {
        self.shards.iter().find_map(|s| s.tensor_view(name))
    }

    /// The address range of each mapping, to check that views lie inside them.
    pub fn mapped_ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.shards.iter().map(Shard::mapped_range).collect()
    }
}

impl Shard {
    /// The file, relative to the generation.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.header.tensors.iter().map(|info| self.view(info))
    }

    /// One tensor by name.
    pub fn tensor_view(&self, name: &str) -> Option<TensorView<'_>> {
        self.header
            .tensors
            .iter()
            .find(|t| t.name == name)
            .map(|info| self.view(info))
    }

    fn view<'a>(&'a self, info: &'a TensorInfo) -> TensorView<'a> {
        let start = (self.header.data_offset + info.begin) as usize;
        let end = (self.header.data_offset + info.end) as usize;
        // validate_header proved start <= end <= file size == map length.
        TensorView {
            info,
            data: &self.map[start..end],
            map: &self.map,
        }
    }

    /// The mapping (for the tch tensors that keep it alive).
    #[cfg(feature = "tch")]
    pub(crate) fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// The address range of the mapping.
    pub fn mapped_range(&self) -> std::ops::Range<usize> {
        let start = self.map.as_ptr() as usize;
        start..start + self.map.len()
    }
}
