//! The metrics registry of the process (a mount daemon's, `imagefs mount ... --metrics ADDR`):
//! the counters and histograms, and the one-line hooks the FUSE adapter, substitution and the
//! agent client call. Callers pass plain labels (a file's kind and name, a step, an operation),
//! so this module knows no mount, VM or daemon; the daemon turns it on (`enable`) and serves
//! `render` over HTTP (daemon/metrics.rs). README.md "Metrics" documents each metric.
//! Invariants: until `enable` every hook returns at its first load (nothing is counted); the
//! read path takes no lock: each session thread keeps the counters of the handles it served
//! (by fh, never reused), so a read is a thread-local lookup and a few atomic adds; the remote
//! tier's counters are read from the store at scrape time, not kept twice.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use imagefs_store::Store;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

/// Handles a session thread remembers before it forgets them all (fhs are never reused, so
/// released ones would otherwise pile up).
const CACHED_HANDLES: usize = 256;

/// Read latency buckets, seconds: 20 us (a cached block) to ~10 s (a remote's deadline).
fn read_buckets() -> Vec<f64> {
    vec![
        20e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
        250e-3, 500e-3, 1.0, 2.5, 10.0,
    ]
}

/// Step and round-trip buckets, seconds: 100 us to 30 s.
fn step_buckets() -> Vec<f64> {
    vec![
        100e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5,
        5.0, 15.0, 30.0,
    ]
}

/// A file of the mount, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `instances/ID.raw`.
    Instance,
    /// `versions/ID.raw` or `images/NAME/TAG.raw`.
    Version,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Instance => "instance",
            Kind::Version => "version",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The daemon's metrics.
struct Metrics {
    registry: Registry,
    reads: IntCounterVec,
    read_bytes: IntCounterVec,
    writes: IntCounterVec,
    written_bytes: IntCounterVec,
    /// Per kind.
    read_errors: [IntCounter; 2],
    read_seconds: [Histogram; 2],
    /// Opens served by the daemon, opens passed through to a flat copy.
    opens: [IntCounter; 2],
    integrity_errors: IntCounter,
    substitutions: IntCounter,
    substitution_conflicts: IntCounter,
    substitution_steps: HistogramVec,
    agent_round_trips: HistogramVec,
    agent_failures: IntCounterVec,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The metrics, once the daemon serves them.
fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    fn new(store: Option<Arc<Store>>) -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let file = &["kind", "file"];
        let read_errors = counter_vec(
            &r,
            "imagefs_read_errors_total",
            "Reads of mount files answered with an error.",
            &["kind"],
        )?;
        let read_seconds = histogram_vec(
            &r,
            "imagefs_read_duration_seconds",
            "Time the daemon took to answer a read of a mount file.",
            &["kind"],
            read_buckets(),
        )?;
        let opens = counter_vec(
            &r,
            "imagefs_opens_total",
            "Opens of mount files: mode cached (read through the daemon, counted here) or \
             passthrough (the kernel reads a flat copy; the daemon sees no reads).",
            &["mode"],
        )?;
        let per_kind_err = |k: Kind| read_errors.with_label_values(&[k.label()]);
        let per_kind_hist = |k: Kind| read_seconds.with_label_values(&[k.label()]);
        let m = Metrics {
            reads: counter_vec(
                &r,
                "imagefs_reads_total",
                "Reads the daemon answered, per file.",
                file,
            )?,
            read_bytes: counter_vec(
                &r,
                "imagefs_read_bytes_total",
                "Bytes the daemon returned to reads, per file.",
                file,
            )?,
            writes: counter_vec(
                &r,
                "imagefs_writes_total",
                "Writes the daemon answered, per file.",
                file,
            )?,
            written_bytes: counter_vec(
                &r,
                "imagefs_written_bytes_total",
                "Bytes written, per file.",
                file,
            )?,
            read_errors: [per_kind_err(Kind::Instance), per_kind_err(Kind::Version)],
            read_seconds: [per_kind_hist(Kind::Instance), per_kind_hist(Kind::Version)],
            opens: [
                opens.with_label_values(&["cached"]),
                opens.with_label_values(&["passthrough"]),
            ],
            integrity_errors: counter(
                &r,
                "imagefs_integrity_errors_total",
                "Local data that failed its hash when the mount read it (answered EIO).",
            )?,
            substitutions: counter(
                &r,
                "imagefs_substitutions_total",
                "Substitutions done by this daemon (dry runs not counted).",
            )?,
            substitution_conflicts: counter(
                &r,
                "imagefs_substitution_conflicts_total",
                "Substitutions refused for conflicting guest writes.",
            )?,
            substitution_steps: histogram_vec(
                &r,
                "imagefs_substitution_step_seconds",
                "Time of each step of a substitution.",
                &["step"],
                step_buckets(),
            )?,
            agent_round_trips: histogram_vec(
                &r,
                "imagefs_agent_round_trip_seconds",
                "Round trips to guest agents that were answered, per operation.",
                &["op"],
                step_buckets(),
            )?,
            agent_failures: counter_vec(
                &r,
                "imagefs_agent_failures_total",
                "Agent calls that got no answer (timeout, error), per operation.",
                &["op"],
            )?,
            registry: r,
        };
        if let Some(store) = store {
            m.registry
                .register(Box::new(RemoteCollector::new(store)?))?;
        }
        Ok(m)
    }

    fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

/// The remote tier's fetch counters (`imagefs remote stats`), read from the store at scrape
/// time: they are kept (and persisted) there already.
struct RemoteCollector {
    store: Arc<Store>,
    descs: Vec<Desc>,
}

/// (name, help) of each remote counter, in `collect`'s order.
const REMOTE: [(&str, &str); 5] = [
    (
        "imagefs_remote_requests_total",
        "Ranged reads of remote packs that arrived (lazy reads, substitutions, pulls).",
    ),
    (
        "imagefs_remote_fetched_bytes_total",
        "Bytes of blocks fetched from the remote.",
    ),
    (
        "imagefs_remote_fetched_blocks_total",
        "Blocks fetched from the remote, verified and stored.",
    ),
    (
        "imagefs_cache_hits_total",
        "Blocks a read of a lazy version wanted that were already local (no fetch).",
    ),
    (
        "imagefs_remote_integrity_errors_total",
        "Blocks or maps from the remote that failed their hash (nothing of them stored).",
    ),
];

impl RemoteCollector {
    fn new(store: Arc<Store>) -> prometheus::Result<RemoteCollector> {
        let descs = REMOTE
            .iter()
            .map(|(n, h)| {
                Desc::new(
                    n.to_string(),
                    h.to_string(),
                    vec!["remote".into()],
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<Vec<Desc>>>()?;
        Ok(RemoteCollector { store, descs })
    }
}

impl Collector for RemoteCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self.store.remote_stats();
        let mut out = Vec::new();
        for (i, (name, help)) in REMOTE.iter().enumerate() {
            let Ok(vec) = IntCounterVec::new(Opts::new(*name, *help), &["remote"]) else {
                continue;
            };
            for (remote, c) in &stats.remotes {
                let t = &c.total;
                let v = [
                    t.requests,
                    t.bytes_fetched,
                    t.blocks_fetched,
                    t.cache_hits,
                    t.integrity_errors,
                ][i];
                vec.with_label_values(&[remote.as_str()]).inc_by(v);
            }
            out.extend(vec.collect());
        }
        out
    }
}

/// One open file's counters, as a session thread keeps them.
struct FileCounters {
    kind: Kind,
    reads: IntCounter,
    read_bytes: IntCounter,
    writes: IntCounter,
    written_bytes: IntCounter,
}

thread_local! {
    /// fh -> counters of that open file, per session thread (no lock on the read path).
    static FILES: RefCell<HashMap<u64, FileCounters>> = RefCell::new(HashMap::new());
}

/// Runs `f` on the counters of open file `fh`, made from `label` on this thread's first use.
fn with_file(
    m: &Metrics,
    fh: u64,
    label: impl FnOnce() -> (Kind, String),
    f: impl FnOnce(&FileCounters),
) {
    FILES.with_borrow_mut(|files| {
        if !files.contains_key(&fh) {
            if files.len() >= CACHED_HANDLES {
                files.clear();
            }
            let (kind, file) = label();
            let l = [kind.label(), file.as_str()];
            files.insert(
                fh,
                FileCounters {
                    kind,
                    reads: m.reads.with_label_values(&l),
                    read_bytes: m.read_bytes.with_label_values(&l),
                    writes: m.writes.with_label_values(&l),
                    written_bytes: m.written_bytes.with_label_values(&l),
                },
            );
        }
        if let Some(c) = files.get(&fh) {
            f(c);
        }
    });
}

/// When a read or write starts: `None` (and nothing measured) without --metrics.
pub fn start() -> Option<Instant> {
    get().map(|_| Instant::now())
}

/// A read of open file `fh` answered with `bytes` (None: an error), started at `t`.
pub fn read(
    t: Option<Instant>,
    fh: u64,
    label: impl FnOnce() -> (Kind, String),
    bytes: Option<usize>,
) {
    let (Some(m), Some(t)) = (get(), t) else {
        return;
    };
    let d = t.elapsed();
    with_file(m, fh, label, |c| {
        m.read_seconds[c.kind.index()].observe(d.as_secs_f64());
        match bytes {
            Some(n) => {
                c.reads.inc();
                c.read_bytes.inc_by(n as u64);
            }
            None => m.read_errors[c.kind.index()].inc(),
        }
    });
}

/// A write of open file `fh` of `bytes` (None: an error; not counted).
pub fn write(fh: u64, label: impl FnOnce() -> (Kind, String), bytes: Option<usize>) {
    let (Some(m), Some(n)) = (get(), bytes) else {
        return;
    };
    with_file(m, fh, label, |c| {
        c.writes.inc();
        c.written_bytes.inc_by(n as u64);
    });
}

/// A mount file opened, served by the daemon or passed through to a flat copy.
pub fn opened(passthrough: bool) {
    if let Some(m) = get() {
        m.opens[usize::from(passthrough)].inc();
    }
}

/// Local data failed its hash on a read of the mount.
pub fn integrity_error() {
    if let Some(m) = get() {
        m.integrity_errors.inc();
    }
}

/// A substitution done, with its steps' times in microseconds (step name, us).
pub fn substitution(steps: &[(&str, u64)]) {
    let Some(m) = get() else { return };
    m.substitutions.inc();
    for (step, us) in steps {
        m.substitution_steps
            .with_label_values(&[*step])
            .observe(*us as f64 / 1e6);
    }
}

/// A substitution refused for conflicts.
pub fn substitution_conflict() {
    if let Some(m) = get() {
        m.substitution_conflicts.inc();
    }
}

/// An answered round trip to a guest agent (`op`: notice, ping, exec, ...) that took `d`.
pub fn agent_round_trip(op: &str, d: Duration) {
    if let Some(m) = get() {
        m.agent_round_trips
            .with_label_values(&[op])
            .observe(d.as_secs_f64());
    }
}

/// An agent call of `op` that got no answer.
pub fn agent_failure(op: &str) {
    if let Some(m) = get() {
        m.agent_failures.with_label_values(&[op]).inc();
    }
}

/// Turns the metrics on, with the remote tier of `store`. One registry per process: a second
/// call keeps the first.
pub fn enable(store: Arc<Store>) -> prometheus::Result<()> {
    let m = Metrics::new(Some(store))?;
    let _ = METRICS.set(m);
    Ok(())
}

/// The metrics in the text exposition format (0.0.4); `None` while they are off.
pub fn render() -> Option<prometheus::Result<Vec<u8>>> {
    get().map(Metrics::render)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_renders_every_metric_family_in_text_format() {
        let m = Metrics::new(None).unwrap();
        m.reads.with_label_values(&["instance", "vm1"]).inc_by(3);
        m.read_seconds[Kind::Version.index()].observe(0.001);
        m.substitution_steps
            .with_label_values(&["total"])
            .observe(0.5);
        let text = String::from_utf8(m.render().unwrap()).unwrap();
        assert!(
            text.contains("imagefs_reads_total{file=\"vm1\",kind=\"instance\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("imagefs_read_duration_seconds_count{kind=\"version\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("imagefs_substitution_step_seconds_count{step=\"total\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE imagefs_integrity_errors_total counter"),
            "{text}"
        );
    }
}
