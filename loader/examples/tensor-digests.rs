//! Prints, as JSON, the sha256 of every tensor of a volume as tch sees it,
//! and whether each tensor's storage lies inside the file mapping. The
//! Python tests compare this with what `modelwrapper.load()` sees.
//!
//! `cargo run -p zerocopy-loader --features tch --example tensor-digests -- <volume>`

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use tch::Kind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: tensor-digests <volume-path>")?;
    let pipeline = zerocopy_loader::load(&path)?;
    let mut out: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
    for c in pipeline.components() {
        let ranges = c.mapped_ranges();
        let entry = out.entry(c.name().to_string()).or_default();
        for (name, t) in c.tch_tensors()? {
            let bytes: Vec<u8> = Vec::<u8>::try_from(t.view_dtype(Kind::Uint8).flatten(0, -1))?;
            let ptr = t.data_ptr() as usize;
            let inside = bytes.is_empty() || ranges.iter().any(|r| r.contains(&ptr));
            entry.insert(
                name,
                serde_json::json!({"sha256": hex::encode(Sha256::digest(&bytes)), "zeroCopy": inside}),
            );
        }
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
