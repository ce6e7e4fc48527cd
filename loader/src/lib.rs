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
mod torch;
#[cfg(feature = "tch")]
pub use torch::{BindError, Binding};

/// Safetensors `__metadata__` key holding the Python attribute name.
pub const ATTRIBUTE_KEY: &str = "zerocopy.attribute";

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

/// One component's weights, mapped. The mapping is reference-counted: tch
/// tensors made from it hold a reference in their storage, so it stays mapped
/// until the last tensor (or view of one) is gone, whatever safe code does.
#[derive(Debug)]
pub struct Component {
    name: String,
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
        .map(|c| map_component(path, &c.name, &c.weights.file.file, c.weights.file.bytes))
        .collect::<Result<_, _>>()?;
    Ok(Pipeline {
        path: path.to_path_buf(),
        manifest,
        components,
    })
}

fn map_component(dir: &Path, name: &str, file: &str, expected: u64) -> Result<Component, LoadError> {
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
    Ok(Component {
        name: name.into(),
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

    /// The Python attribute this component came from, when recorded.
    pub fn attribute(&self) -> Option<&str> {
        self.header.metadata.get(ATTRIBUTE_KEY).map(String::as_str)
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
        }
    }

    /// The address range of the mapping, to check that views lie inside it.
    pub fn mapped_range(&self) -> std::ops::Range<usize> {
        let start = self.map.as_ptr() as usize;
        start..start + self.map.len()
    }
}
