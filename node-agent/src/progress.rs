//! Terminal progress bars for standalone fills (hidden when stderr is not a
//! terminal, so CI logs stay readable).

use std::sync::Arc;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::fill::ProgressFactory;
use crate::source::Progress;

/// One bar per file of the wrapper being filled.
pub struct Bars {
    multi: MultiProgress,
    wrapper: String,
}

impl Bars {
    /// Bars for `wrapper` (`namespace/name`) on stderr.
    pub fn new(wrapper: &str) -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            wrapper: wrapper.to_string(),
        }
    }
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl ProgressFactory for Bars {
    fn file(&self, component: &str, file: &str, total: Option<u64>) -> Arc<dyn Progress> {
        let bar = self.multi.add(ProgressBar::new(total.unwrap_or(0)));
        let style = ProgressStyle::with_template(
            "{prefix:.bold} {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(format!("{} {component} ({file})", self.wrapper));
        Arc::new(Bar(bar))
    }
}
