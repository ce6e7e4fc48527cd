//! tch tensors over the mapping, and binding them into a VarStore.

#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use tch::{nn::VarStore, Device, Kind, Tensor};
use zerocopy_api::safetensors::Dtype;

use crate::{Component, Pipeline, TensorView};

/// A tensor whose storage is the pipeline's mapping; it cannot outlive the
/// [`Component`] it borrows. (A `shallow_clone` of it escapes this check:
/// keep clones inside the same scope.)
#[derive(Debug)]
pub struct BorrowedTensor<'a> {
    tensor: Tensor,
    _mapping: PhantomData<&'a Component>,
}

impl Deref for BorrowedTensor<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

/// A VarStore whose variables point into a pipeline's mapping; it borrows
/// the pipeline so the mapping outlives every variable.
#[derive(Debug)]
pub struct Binding<'a> {
    vs: VarStore,
    /// Variables bound, by name.
    pub bound: Vec<String>,
    /// Tensors in the weights that no variable uses.
    pub unused: Vec<String>,
    _pipeline: PhantomData<&'a Pipeline>,
}

impl Deref for Binding<'_> {
    type Target = VarStore;
    fn deref(&self) -> &VarStore {
        &self.vs
    }
}

impl DerefMut for Binding<'_> {
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

fn from_view(view: TensorView<'_>) -> Result<Tensor, BindError> {
    let shape: Vec<i64> = view.info.shape.iter().map(|&d| d as i64).collect();
    let kind = kind_of(view.info.dtype).ok_or_else(|| BindError::UnsupportedDtype {
        name: view.info.name.clone(),
        dtype: view.info.dtype.as_str(),
    })?;
    if view.data.is_empty() {
        return Ok(Tensor::zeros(shape.as_slice(), (kind, Device::Cpu)));
    }
    // SAFETY: `view.data` is a live slice of the component's mapping holding
    // exactly shape × element-size bytes (validate_header), aligned to the
    // element size (checked too); the returned tensor is wrapped in a type
    // that borrows the component, so the mapping outlives it. The mapping is
    // read-only: libtorch never writes unless the caller runs an in-place op.
    Ok(unsafe { Tensor::from_blob(view.data.as_ptr(), &shape, &[], kind, Device::Cpu) })
}

impl Component {
    /// One tensor, zero-copy.
    pub fn tensor(&self, name: &str) -> Result<BorrowedTensor<'_>, BindError> {
        let view = self.tensor_view(name).ok_or_else(|| BindError::Missing {
            component: self.name.clone(),
            names: name.into(),
        })?;
        Ok(BorrowedTensor {
            tensor: from_view(view)?,
            _mapping: PhantomData,
        })
    }

    /// Every tensor, zero-copy, by name.
    pub fn tch_tensors(&self) -> Result<Vec<(String, BorrowedTensor<'_>)>, BindError> {
        self.tensors()
            .map(|v| {
                Ok((
                    v.info.name.clone(),
                    BorrowedTensor {
                        tensor: from_view(v)?,
                        _mapping: PhantomData,
                    },
                ))
            })
            .collect()
    }
}

impl Pipeline {
    /// Points every variable of `vs` at the matching tensor of `component`
    /// without copying (names as in the safetensors file, `.`-separated, as
    /// tch's paths are). Every variable must be present with the same shape
    /// and kind; extra tensors are reported in [`Binding::unused`].
    pub fn bind(&self, component: &str, vs: VarStore) -> Result<Binding<'_>, BindError> {
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
            }
        }
        let mut bound = Vec::new();
        tch::no_grad(|| {
            for (name, mut var) in vars {
                if let Some(v) = c.tensor_view(&name) {
                    // kinds were checked above, so from_view cannot fail here
                    if let Ok(t) = from_view(v) {
                        var.set_data(&t);
                        bound.push(name);
                    }
                }
            }
        });
        let unused = c
            .tensors()
            .map(|v| v.info.name.clone())
            .filter(|n| !bound.contains(n))
            .collect();
        Ok(Binding {
            vs,
            bound,
            unused,
            _pipeline: PhantomData,
        })
    }
}
