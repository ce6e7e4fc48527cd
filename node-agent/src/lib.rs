//! The zerocopy node agent: fills ModelWrapper generations into shared
//! memory. `main.rs` is a thin CLI over this library.

pub mod cluster;
pub mod csi;
pub mod error;
pub mod fill;
pub mod hugepages;
pub mod layout;
pub mod manifests;
pub mod mount;
pub mod peer;
pub mod progress;
pub mod root_tmpfs;
pub mod secrets;
pub mod serve;
pub mod source;
pub mod standalone;
pub mod status;
pub mod supervisor;

pub use error::FillError;
pub use fill::{FillEngine, FillOutcome, MountMode};
pub use layout::VolumeRoot;
