//! One operation per volume id at a time: a second concurrent request for the
//! same id gets ABORTED (kubelet retries), as the CSI spec recommends.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Volume ids with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    ids: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; releases the id when dropped.
#[derive(Debug)]
pub struct Guard {
    ids: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl InFlight {
    /// Claims `id`, or `None` when another operation holds it.
    pub fn try_claim(&self, id: &str) -> Option<Guard> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.insert(id.to_string()).then(|| Guard {
            ids: self.ids.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_waits_for_the_first_to_drop() {
        let f = InFlight::default();
        let g = f.try_claim("a").unwrap();
        assert!(f.try_claim("a").is_none());
        assert!(f.try_claim("b").is_some());
        drop(g);
        assert!(f.try_claim("a").is_some());
    }
}
