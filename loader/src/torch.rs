//! tch tensors over the mapping, and binding them into a VarStore.
//!
//! Every tensor's storage owns a reference to the component's mapping
//! (`csrc/owned_blob.cpp`: `at::from_blob` with a deleter), so views, slices,
//! shallow clones and VarStore variables keep the mapping alive: no safe code
//! can read unmapped memory.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use memmap2::Mmap;
use tch::{nn::VarStore, Device, Kind, Tensor};
use zerocopy_api::safetensors::Dtype;

use crate::{Component, Pipeline, TensorView};

extern "C" {
    fn zerocopy_loader_tensor_over(
        data: *mut c_void,
        dims: *const i64,
        ndims: usize,
        scalar_type: c_int,
        owner: *mut c_void,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn zerocopy_loader_free_error(error: *mut c_char);
}

/// Called by libtorch when the last tensor using a storage is freed.
#[no_mangle]
extern "C" fn zerocopy_loader_release(owner: *mut c_void) {
    // SAFETY: `owner` is the pointer `tensor_over` made with `Arc::into_raw`
    // for exactly this storage; libtorch calls the deleter once per storage.
    drop(unsafe { Arc::from_raw(owner.cast_const().cast::<Mmap>()) });
}

/// A VarStore whose variables point into a pipeline's mapping (they keep it
/// mapped; the pipeline itself may be dropped).
#[derive(Debug)]
pub struct Binding {
    vs: VarStore,
    /// Variables bound, by name.
    pub bound: Vec<String>,
    /// Tensors in the weights that no variable uses.
    pub unused: Vec<String>,
}

impl Binding {
    /// The VarStore.
    pub fn into_inner(self) -> VarStore {
        self.vs
    }
}

impl Deref for Binding {
    type Target = VarStore;
    fn deref(&self) -> &VarStore {
        &self.vs
    }
}

impl DerefMut for Binding {
    fn deref_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }
}

/// Why a VarStore could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// No such component.
    #[error("no component {0:?} in this pipeline")]
    NoComponent(String),
    /// The VarStore is not on the CPU.
    #[error("the VarStore is on {0:?}; zero-copy binding needs Device::Cpu (move after binding)")]
    NotCpu(Device),
    /// Variables without weights.
    #[error("component {component}: variables missing from the weights: {names}")]
    Missing {
        /// Component.
        component: String,
        /// Comma-separated names.
        names: String,
    },
    /// A dtype tch cannot represent.
    #[error("tensor {name:?} has dtype {dtype}, which tch cannot represent")]
    UnsupportedDtype {
        /// Tensor.
        name: String,
        /// dtype name.
        dtype: &'static str,
    },
    /// A shape or dtype differs.
    #[error("component {component}: {name}: weights are {found}, the variable is {expected}")]
    Mismatch {
        /// Component.
        component: String,
        /// Variable.
        name: String,
        /// In the weights.
        found: String,
        /// In the VarStore.
        expected: String,
    },
    /// libtorch refused to make the tensor.
    #[error("tensor {name:?}: libtorch: {message}")]
    Torch {
        /// Tensor.
        name: String,
        /// libtorch's message.
        message: String,
    },
}

/// The tch kind of a safetensors dtype; tch has no unsigned 16/32/64-bit kinds.
pub fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::Bool => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::F8E5M2 => Kind::Float8e5m2,
        Dtype::F8E4M3 => Kind::Float8e4m3fn,
        Dtype::I16 => Kind::Int16,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I32 => Kind::Int,
        Dtype::F32 => Kind::Float,
        Dtype::I64 => Kind::Int64,
        Dtype::F64 => Kind::Double,
        Dtype::U16 | Dtype::U32 | Dtype::U64 => return None,
    })
}

/// c10::ScalarType of the kinds [`kind_of`] returns (c10/core/ScalarType.h).
fn scalar_type(kind: Kind) -> c_int {
    match kind {
        Kind::Uint8 => 0,
        Kind::Int8 => 1,
        Kind::Int16 => 2,
        Kind::Int => 3,
        Kind::Int64 => 4,
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::Bool => 11,
        Kind::BFloat16 => 15,
        Kind::Float8e5m2 => 23,
        Kind::Float8e4m3fn => 24,
        // kind_of returns none of the others.
        _ => -1,
    }
}

fn tensor_over(view: TensorView<'_>) -> Result<Tensor, BindError> {
    let shape: Vec<i64> = view.info.shape.iter().map(|&d| d as i64).collect();
    let kind = kind_of(view.info.dtype).ok_or_else(|| BindError::UnsupportedDtype {
        name: view.info.name.clone(),
        dtype: view.info.dtype.as_str(),
    })?;
    if view.data.is_empty() {
        return Ok(Tensor::zeros(shape.as_slice(), (kind, Device::Cpu)));
    }
    // validate_header: `data` holds exactly shape x element-size bytes,
    // aligned to the element size.
    shaped_over(&view.info.name, view.map, view.data, &shape, kind)
}

/// `data`, a non-empty slice of `map`, as a flat uint8 tensor (zero-copy;
/// it keeps the mapping alive).
pub(crate) fn tensor_over_bytes(name: &str, map: &Arc<Mmap>, data: &[u8]) -> Result<Tensor, BindError> {
    shaped_over(name, map, data, &[data.len() as i64], Kind::Uint8)
}

/// A tensor of `shape` and `kind` over `data`, which must be a slice of
/// `map` holding exactly shape x element-size bytes, aligned to the
/// element size (the callers' invariants).
fn shaped_over(name: &str, map: &Arc<Mmap>, data: &[u8], shape: &[i64], kind: Kind) -> Result<Tensor, BindError> {
    let owner = Arc::into_raw(map.clone()).cast_mut().cast::<c_void>();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: `data` is a slice of `map` holding exactly shape ×
    // element-size bytes, aligned to the element size (the callers check:
    // validate_header for tensors, a byte tensor for whole regions). The tensor's storage owns `owner`, one strong count of
    // `map`, released by `zerocopy_loader_release` when libtorch frees the
    // storage, so the bytes stay mapped while any tensor can reach them. The
    // mapping is read-only: an in-place op faults instead of writing.
    let raw = unsafe {
        zerocopy_loader_tensor_over(
            data.as_ptr().cast_mut().cast(),
            shape.as_ptr(),
            shape.len(),
            scalar_type(kind),
            owner,
            &mut error,
        )
    };
    if raw.is_null() {
        // SAFETY: on failure the C++ side set `error` to a strdup'ed string (or
        // left it null), and took no ownership of `owner` (it leaks one count,
        // keeping the mapping: safe).
        let message = unsafe {
            if error.is_null() {
                "unknown error".to_string()
            } else {
                let m = CStr::from_ptr(error).to_string_lossy().into_owned();
                zerocopy_loader_free_error(error);
                m
            }
        };
        return Err(BindError::Torch {
            name: name.to_string(),
            message,
        });
    }
    // SAFETY: `raw` is a heap-allocated at::Tensor, which is what tch's
    // C_tensor handles are; the returned Tensor owns and frees it.
    Ok(unsafe { Tensor::from_ptr(raw.cast()) })
}

impl Component {
    /// One tensor, zero-copy; it keeps the mapping alive.
    pub fn tensor(&self, name: &str) -> Result<Tensor, BindError> {
        let view = self.tensor_view(name).ok_or_else(|| BindError::Missing {
            component: self.name.clone(),
            names: name.into(),
        })?;
        tensor_over(view)
    }

    /// Every tensor, zero-copy, by name.
    pub fn tch_tensors(&self) -> Result<Vec<(String, Tensor)>, BindError> {
        self.tensors()
            .map(|v| Ok((v.info.name.clone(), tensor_over(v)?)))
            .collect()
    }
}

impl Pipeline {
    /// Points every variable of `vs` at the matching tensor of `component`
    /// without copying (names as in the safetensors file, `.`-separated, as
    /// tch's paths are). Every variable must be present with the same shape
    /// and kind; extra tensors are reported in [`Binding::unused`].
    pub fn bind(&self, component: &str, vs: VarStore) -> Result<Binding, BindError> {
        let c = self
            .component(component)
            .ok_or_else(|| BindError::NoComponent(component.into()))?;
        if vs.device() != Device::Cpu {
            return Err(BindError::NotCpu(vs.device()));
        }
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let missing: Vec<&str> = vars
            .iter()
            .filter(|(n, _)| c.tensor_view(n).is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(BindError::Missing {
                component: component.into(),
                names: missing.join(", "),
            });
        }
        let mut tensors = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            if let Some(v) = c.tensor_view(name) {
                let shape: Vec<i64> = v.info.shape.iter().map(|&d| d as i64).collect();
                let kind = kind_of(v.info.dtype);
                if shape != var.size() || kind != Some(var.kind()) {
                    return Err(BindError::Mismatch {
                        component: component.into(),
                        name: name.clone(),
                        found: format!("{kind:?}{shape:?}"),
                        expected: format!("{:?}{:?}", var.kind(), var.size()),
                    });
                }
                tensors.push(tensor_over(v)?);
            }
        }
        let mut bound = Vec::new();
        tch::no_grad(|| {
            for ((name, mut var), t) in vars.into_iter().zip(&tensors) {
                var.set_data(t);
                bound.push(name);
            }
        });
        let unused = c
            .tensors()
            .map(|v| v.info.name.clone())
            .filter(|n| !bound.contains(n))
            .collect();
        Ok(Binding { vs, bound, unused })
    }
}
