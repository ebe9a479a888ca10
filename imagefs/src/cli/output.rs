//! Command output: human text or JSON Lines (progress events, then one result object), and a
//! progress bar only when stderr is a terminal and the output is not JSON.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::error::CliError;

/// Where a command writes; never the process's stdout directly (the daemon streams it).
pub struct Out<'a> {
    w: &'a mut dyn Write,
    /// JSON Lines instead of text.
    pub json: bool,
    bar: Option<ProgressBar>,
    last_pct: Option<u64>,
}

impl<'a> Out<'a> {
    pub fn new(w: &'a mut dyn Write, json: bool) -> Out<'a> {
        Out {
            w,
            json,
            bar: None,
            last_pct: None,
        }
    }

    /// Starts a progress report of `total` units (bytes unless said otherwise).
    pub fn start(&mut self, what: &str, total: u64) {
        self.last_pct = None;
        if !self.json && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("=> "));
            bar.set_message(what.to_string());
            self.bar = Some(bar);
        }
    }

    /// Reports progress: moves the bar, or emits a JSON event at each whole percent.
    pub fn progress(&mut self, what: &str, done: u64, total: u64) -> Result<(), CliError> {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
        if self.json {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            if self.last_pct != Some(pct) {
                self.last_pct = Some(pct);
                let ev = serde_json::json!({"type": "progress", "op": what, "done": done, "total": total});
                writeln!(self.w, "{ev}")?;
            }
        }
        Ok(())
    }

    /// Writes a line of its own before the result: text, or a JSON `note` event.
    pub fn note(&mut self, text: &str) -> Result<(), CliError> {
        if self.json {
            let ev = serde_json::json!({"type": "note", "text": text});
            writeln!(self.w, "{ev}")?;
        } else {
            writeln!(self.w, "{text}")?;
        }
        Ok(())
    }

    /// Writes a JSON event of the command's own (JSON mode only; text mode shows the bar).
    pub fn event(&mut self, value: Value) -> Result<(), CliError> {
        if self.json {
            writeln!(self.w, "{value}")?;
            self.w.flush()?;
        }
        Ok(())
    }

    /// Ends the progress report.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// Writes the result: `human` as text, or `value` (with "type": "result") as one JSON line.
    pub fn result(&mut self, value: Value, human: &str) -> Result<(), CliError> {
        self.finish();
        if self.json {
            let mut v = value;
            if let Value::Object(m) = &mut v {
                m.insert("type".to_string(), Value::from("result"));
            }
            writeln!(self.w, "{v}")?;
        } else if !human.is_empty() {
            writeln!(self.w, "{}", human.trim_end())?;
        }
        self.w.flush()?;
        Ok(())
    }
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
