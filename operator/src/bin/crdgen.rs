//! Writes the CRDs generated from `zerocopy-api` into the given directories
//! (default: `crds/` and the chart's copy, `charts/zerocopy/files/crds/`).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut dirs: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec![PathBuf::from("crds"), PathBuf::from("charts/zerocopy/files/crds")];
    }
    let crds = zerocopy_operator::crds::all()?;
    for dir in &dirs {
        std::fs::create_dir_all(dir)?;
        for (file, yaml) in &crds {
            let path = dir.join(file);
            std::fs::write(&path, yaml)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
