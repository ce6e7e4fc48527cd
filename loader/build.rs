//! With the `tch` feature, compiles `csrc/owned_blob.cpp` against the
//! libtorch that torch-sys links (the pip-installed torch, as tch is built
//! here with LIBTORCH_USE_PYTORCH=1, or $LIBTORCH).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=csrc/owned_blob.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    let (includes, cxx11_abi) = libtorch();
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .includes(&includes)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .file("csrc/owned_blob.cpp")
        .compile("zerocopy_owned_blob");
}

/// Include directories and the C++11 ABI flag of the libtorch in use.
fn libtorch() -> (Vec<PathBuf>, String) {
    if let Some(root) = std::env::var_os("LIBTORCH").map(PathBuf::from) {
        let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
        return (
            vec![root.join("include"), root.join("include/torch/csrc/api/include")],
            abi,
        );
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-c",
            "import torch, os; from torch.utils import cpp_extension as c; print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print('\\n'.join(c.include_paths()))",
        ])
        .output();
    let out = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => panic!(
            "{python} could not report torch's include paths: {}; install torch (pip install -r requirements-dev.txt) or set LIBTORCH",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("running {python}: {e}; install Python with torch or set LIBTORCH"),
    };
    let mut lines = out.lines();
    let abi = lines.next().unwrap_or("1").trim().to_string();
    (lines.map(PathBuf::from).collect(), abi)
}
