//! Safetensors files written byte by byte, so tests control every field,
//! including the broken ones.

/// One tensor to write: name, dtype string, shape, element size, data.
#[derive(Debug, Clone)]
pub struct T {
    /// Key.
    pub name: String,
    /// Header dtype.
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<u64>,
    /// Raw bytes.
    pub data: Vec<u8>,
}

impl T {
    /// An f32 tensor of `n` deterministic values seeded by `seed`.
    pub fn f32(name: &str, n: usize, seed: u32) -> Self {
        let data = (0..n)
            .flat_map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) as f32 / 1e9).to_le_bytes())
            .collect();
        Self {
            name: name.into(),
            dtype: "F32",
            shape: vec![n as u64],
            data,
        }
    }
}

/// A valid file: header padded to 8 bytes, tensors laid out in order.
pub fn file(tensors: &[T]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.data.len() as u64;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let data: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
    raw(&serde_json::Value::Object(header).to_string(), &data)
}

/// A file from a literal header and data, header padded with spaces to 8.
pub fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}
