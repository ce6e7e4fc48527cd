//! Reading ModelWrapper objects from YAML files (standalone mode).

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zerocopy_api::labels::{GROUP, VERSION};
use zerocopy_api::ModelWrapper;

/// A wrapper read from a file, with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedWrapper {
    /// File it came from.
    pub file: PathBuf,
    /// Namespace (`default` when the file gives none).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The object.
    pub wrapper: ModelWrapper,
}

/// A file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Unreadable file or directory.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Not YAML, or not a ModelWrapper of the expected shape.
    #[error("{}: document {index}: {message}", path.display())]
    Parse {
        /// Path.
        path: PathBuf,
        /// 1-based document number.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// No ModelWrapper anywhere.
    #[error("{}: no ModelWrapper objects found (expected apiVersion {GROUP}/{VERSION}, kind ModelWrapper)", path.display())]
    Empty {
        /// Path.
        path: PathBuf,
    },
    /// Specs that fail validation: every problem of every wrapper.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<zerocopy_api::ValidationErrors>),
    /// The same namespace/name twice.
    #[error("ModelWrapper {namespace}/{name} is defined twice: in {} and {}", first.display(), second.display())]
    Duplicate {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// First file.
        first: PathBuf,
        /// Second file.
        second: PathBuf,
    },
}

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Reads every ModelWrapper in `path` (a file, or the `*.yaml`/`*.yml` files
/// of a directory). Other kinds in the same files (ModelTask, RayCluster…)
/// are skipped, so an examples directory can be given as is.
pub fn load_wrappers(path: &Path) -> Result<Vec<LoadedWrapper>, LoadError> {
    let mut out: Vec<LoadedWrapper> = Vec::new();
    for (file, i, value) in documents(path)? {
        let parse_err = |message: String| LoadError::Parse {
            path: file.clone(),
            index: i + 1,
            message,
        };
        let meta: TypeMeta = serde_yaml::from_value(value.clone()).map_err(|e| parse_err(e.to_string()))?;
        if meta.kind != "ModelWrapper" {
            continue;
        }
        if meta.api_version != format!("{GROUP}/{VERSION}") {
            return Err(parse_err(format!(
                "apiVersion {:?} is not served; use {GROUP}/{VERSION}",
                meta.api_version
            )));
        }
        let wrapper: ModelWrapper = serde_yaml::from_value(value).map_err(|e| parse_err(e.to_string()))?;
        let namespace = wrapper.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = wrapper
            .metadata
            .name
            .clone()
            .ok_or_else(|| parse_err("metadata.name is required".into()))?;
        if let Some(prev) = out.iter().find(|w| w.namespace == namespace && w.name == name) {
            return Err(LoadError::Duplicate {
                namespace,
                name,
                first: prev.file.clone(),
                second: file.clone(),
            });
        }
        out.push(LoadedWrapper {
            file: file.clone(),
            namespace,
            name,
            wrapper,
        });
    }
    if out.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Every non-empty YAML document of `path` (a file, or the `*.yaml`/`*.yml`
/// files of a directory): `(file, 0-based index, value)`.
fn documents(path: &Path) -> Result<Vec<(PathBuf, usize, serde_yaml::Value)>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = fs::read_dir(path)
            .map_err(read_err)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).map_err(|source| LoadError::Read {
            path: file.clone(),
            source,
        })?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc).map_err(|e| LoadError::Parse {
                path: file.clone(),
                index: i + 1,
                message: e.to_string(),
            })?;
            if !value.is_null() {
                out.push((file.clone(), i, value));
            }
        }
    }
    Ok(out)
}

/// The `kind: Secret` documents of the same files, for sources that name a
/// Secret (`source.secretRef`) in standalone mode.
pub fn load_secrets(paths: &[PathBuf]) -> Result<crate::secrets::StaticSecrets, LoadError> {
    let mut secrets = crate::secrets::StaticSecrets::default();
    for path in paths {
        for (file, i, value) in documents(path)? {
            let parse_err = |message: String| LoadError::Parse {
                path: file.clone(),
                index: i + 1,
                message,
            };
            let meta: TypeMeta = serde_yaml::from_value(value.clone()).map_err(|e| parse_err(e.to_string()))?;
            if meta.kind != "Secret" || meta.api_version != "v1" {
                continue;
            }
            let secret: k8s_openapi::api::core::v1::Secret =
                serde_yaml::from_value(value).map_err(|e| parse_err(e.to_string()))?;
            secrets.insert("default", &secret).map_err(parse_err)?;
        }
    }
    Ok(secrets)
}

/// As [`load_valid`], for `--serve`: a directory with no ModelWrapper yet is
/// an empty set (files may be added later), not an error.
pub fn load_for_serve(paths: &[PathBuf]) -> Result<Vec<LoadedWrapper>, LoadError> {
    load_all(paths, true)
}

/// Reads every file and validates every wrapper, reporting all problems at once.
pub fn load_valid(paths: &[PathBuf]) -> Result<Vec<LoadedWrapper>, LoadError> {
    load_all(paths, false)
}

fn load_all(paths: &[PathBuf], empty_dirs_ok: bool) -> Result<Vec<LoadedWrapper>, LoadError> {
    let mut out = Vec::new();
    for p in paths {
        match load_wrappers(p) {
            Err(LoadError::Empty { path }) if empty_dirs_ok && path.is_dir() => {}
            other => out.extend(other?),
        }
    }
    let invalid: Vec<_> = out
        .iter()
        .filter_map(|w| {
            zerocopy_api::validate_wrapper(&w.namespace, &w.name, &w.wrapper.spec, zerocopy_api::Pinning::Optional)
                .err()
        })
        .collect();
    if invalid.is_empty() {
        Ok(out)
    } else {
        Err(LoadError::Invalid(invalid))
    }
}
