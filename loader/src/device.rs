//! Loading a component onto a device (a CUDA GPU) from the node copy.
//!
//! Each mapped file's data region goes to the device as one allocation, and
//! every tensor is a view of it at its file offset (safetensors offsets are
//! aligned to the element size, so the views are too). For CUDA the bytes
//! move in large chunks through two pinned host buffers: the host copies
//! chunk k+1 out of the mapping while the DMA engine moves chunk k, because
//! a copy from pageable memory runs at a fraction of the link's speed (the
//! same design as the Python loader's `modelwrapper/_device.py`). On the CPU
//! it is one owned copy, which no longer refers to the mapping.

use tch::{Device, Kind, Tensor};

use crate::torch::{kind_of, tensor_over_bytes, BindError};
use crate::{Component, Shard};

/// Bytes per staged chunk: large enough that per-copy overhead vanishes,
/// small enough that two pinned buffers cost little.
pub const CHUNK_BYTES: usize = 32 << 20;

impl Component {
    /// Every tensor copied to `device`, by name, in file order.
    pub fn tch_tensors_on(&self, device: Device) -> Result<Vec<(String, Tensor)>, BindError> {
        let mut out = Vec::new();
        for shard in self.shards() {
            let region = shard_on(shard, device)?;
            for view in shard.tensors() {
                let info = view.info;
                let kind = kind_of(info.dtype).ok_or_else(|| BindError::UnsupportedDtype {
                    name: info.name.clone(),
                    dtype: info.dtype.as_str(),
                })?;
                let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
                let start = info.begin as usize;
                let len = view.data.len();
                let torch_err = |e: tch::TchError| BindError::Torch {
                    name: info.name.clone(),
                    message: e.to_string(),
                };
                let tensor = if len == 0 {
                    Tensor::f_zeros(shape.as_slice(), (kind, device)).map_err(torch_err)?
                } else {
                    region
                        .f_narrow(0, start as i64, len as i64)
                        .and_then(|bytes| bytes.f_view_dtype(kind))
                        .and_then(|typed| typed.f_view(shape.as_slice()))
                        .map_err(torch_err)?
                };
                out.push((info.name.clone(), tensor));
            }
        }
        Ok(out)
    }
}

/// The data region of `shard` (everything after its header) on `device`.
fn shard_on(shard: &Shard, device: Device) -> Result<Tensor, BindError> {
    let map = shard.map();
    let start = shard.header().data_offset as usize;
    let data = &map[start.min(map.len())..];
    let torch_err = |e: tch::TchError| BindError::Torch {
        name: shard.file().to_string(),
        message: e.to_string(),
    };
    let len = data.len() as i64;
    let mut region = Tensor::f_empty([len], (Kind::Uint8, device)).map_err(torch_err)?;
    if data.is_empty() {
        return Ok(region);
    }
    let host = tensor_over_bytes(shard.file(), map, data)?;
    if !device.is_cuda() {
        region.f_copy_(&host).map_err(torch_err)?;
        return Ok(region);
    }
    let chunk = CHUNK_BYTES.min(data.len()) as i64;
    let mut pinned = Vec::with_capacity(2);
    for _ in 0..2 {
        pinned.push(
            Tensor::f_empty([chunk], (Kind::Uint8, Device::Cpu))
                .and_then(|t| t.f_pin_memory(device))
                .map_err(torch_err)?,
        );
    }
    let index = match device {
        Device::Cuda(i) => i as i64,
        _ => 0,
    };
    let mut offset = 0i64;
    let mut k = 0usize;
    while offset < len {
        let n = chunk.min(len - offset);
        // This buffer's last transfer (chunk k-2) ended before chunk k-1
        // was launched, so it can be refilled while chunk k-1 moves.
        let mut buffer = pinned[k % 2].f_narrow(0, 0, n).map_err(torch_err)?;
        buffer
            .f_copy_(&host.f_narrow(0, offset, n).map_err(torch_err)?)
            .map_err(torch_err)?;
        // tch exposes no events: waiting for the device here is what
        // keeps the other buffer from being refilled while in flight.
        if k >= 1 {
            tch::Cuda::synchronize(index);
        }
        let target = region.f_narrow(0, offset, n).map_err(torch_err)?;
        // `_copy_from` returns `target` again; the region keeps the storage.
        let _same_as_target = buffer.f_internal_copy_from(&target, true).map_err(torch_err)?;
        offset += n;
        k += 1;
    }
    tch::Cuda::synchronize(index);
    Ok(region)
}
