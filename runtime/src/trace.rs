//! Named, nested ranges around phases and layers (`fwd/layer.3/attention`, `bwd/…`, `optim`):
//! NVTX ranges for nsys on a GPU, and a recording for tests everywhere.
//!
//! A range is opened with [`range`] and closed when its guard drops. Names nest per thread: the
//! full name of a range is its parents' names joined with `/`. Where the ranges go is a
//! process-wide [`RangeSink`] (none by default, so a range costs one thread-local push);
//! [`Recorder`] keeps the full names for tests, the CUDA runtime installs an NVTX sink.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, RwLock};

/// Receives every range as it opens and closes, with its full name.
pub trait RangeSink: Send + Sync {
    fn push(&self, full_name: &str);
    fn pop(&self);
}

static SINK: RwLock<Option<Arc<dyn RangeSink>>> = RwLock::new(None);

thread_local! {
    static STACK: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Installs `sink` for the whole process (replacing the previous one); `None` removes it.
pub fn set_sink(sink: Option<Arc<dyn RangeSink>>) {
    if let Ok(mut s) = SINK.write() {
        *s = sink;
    }
}

fn sink() -> Option<Arc<dyn RangeSink>> {
    SINK.read().ok().and_then(|s| s.clone())
}

/// The full name of the innermost open range of this thread ("" outside any range).
pub fn current() -> String {
    STACK.with(|s| s.borrow().last().cloned().unwrap_or_default())
}

/// Closes its range when dropped.
#[must_use = "a range closes when its guard drops"]
pub struct Range {
    _private: (),
}

/// Opens the range `name` inside the current one.
pub fn range(name: &str) -> Range {
    let full = STACK.with(|s| {
        let mut s = s.borrow_mut();
        let full = match s.last() {
            Some(parent) if !parent.is_empty() => format!("{parent}/{name}"),
            _ => name.to_string(),
        };
        s.push(full.clone());
        full
    });
    if let Some(sink) = sink() {
        sink.push(&full);
    }
    Range { _private: () }
}

/// Opens a range with an already complete name (not nested under the current one); the tape
/// uses it to replay forward scopes as `bwd/…` during backward.
pub fn range_absolute(full_name: &str) -> Range {
    STACK.with(|s| s.borrow_mut().push(full_name.to_string()));
    if let Some(sink) = sink() {
        sink.push(full_name);
    }
    Range { _private: () }
}

impl Drop for Range {
    fn drop(&mut self) {
        STACK.with(|s| s.borrow_mut().pop());
        if let Some(sink) = sink() {
            sink.pop();
        }
    }
}

/// A sink that records every opened range's full name, in order (for tests).
#[derive(Default)]
pub struct Recorder {
    names: Mutex<Vec<String>>,
    /// Only this thread's ranges, when set.
    thread: Option<std::thread::ThreadId>,
}

impl Recorder {
    /// Records the ranges of every thread.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    /// Records the ranges of the calling thread only (the sink is process-wide; tests running
    /// in parallel open ranges too).
    pub fn this_thread() -> Arc<Recorder> {
        Arc::new(Recorder { names: Mutex::default(), thread: Some(std::thread::current().id()) })
    }

    /// The names recorded so far.
    pub fn names(&self) -> Vec<String> {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
    }
}

impl RangeSink for Recorder {
    fn push(&self, full_name: &str) {
        if self.thread.is_some_and(|t| t != std::thread::current().id()) {
            return;
        }
        if let Ok(mut n) = self.names.lock() {
            n.push(full_name.to_string());
        }
    }
    fn pop(&self) {}
}
