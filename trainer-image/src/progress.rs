//! What the operator sees of a run: `LORAPLANE {json}` event lines on stdout (progress every
//! `logEvery` steps, checkpoints, resumes) and the summary in the termination-message file.
//! Neither ever carries customer text.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use loraplane_crds::trainer::{TrainerEvent, TrainerSummary};

/// Kubernetes truncates termination messages beyond 4096 bytes.
pub const MAX_SUMMARY_BYTES: usize = 4096;

/// Prints one event line (stdout is line-buffered by the container runtime; flush anyway so a
/// crash right after a checkpoint still reports it).
pub fn emit(event: &TrainerEvent) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not kill training.
    let _ = writeln!(out, "{}", event.to_line());
    let _ = out.flush();
}

/// Averages loss and measures throughput between progress lines.
#[derive(Debug)]
pub struct Tracker {
    total: u64,
    every: u64,
    loss_sum: f64,
    loss_n: u64,
    since: Instant,
    since_step: u64,
    /// Seconds since the last line spent on other work (sample sets), not on steps.
    excluded: f64,
    /// Seconds of other work still to come (the sample sets left), added to the ETA.
    overhead_left: f64,
}

impl Tracker {
    /// A tracker for a run of `total` steps starting after step `start`.
    pub fn new(total: u64, every: u32, start: u64) -> Tracker {
        Tracker {
            total,
            every: u64::from(every.max(1)),
            loss_sum: 0.0,
            loss_n: 0,
            since: Instant::now(),
            since_step: start,
            excluded: 0.0,
            overhead_left: 0.0,
        }
    }

    /// Takes `seconds` of work that was not training steps (a sample set) out of the
    /// throughput, and counts `left` seconds of such work still to come into the ETA.
    pub fn exclude(&mut self, seconds: f64, left: f64) {
        self.excluded += seconds;
        self.overhead_left = left;
    }

    /// Records the loss of step `step` (1-based count of completed steps); returns the
    /// progress event when one is due (every `every` steps and at the last step).
    pub fn record(&mut self, step: u64, loss: f64) -> Option<TrainerEvent> {
        self.record_at(step, loss, self.since.elapsed().as_secs_f64())
    }

    /// `record` with the wall seconds since the last line given.
    fn record_at(&mut self, step: u64, loss: f64, wall: f64) -> Option<TrainerEvent> {
        if loss.is_finite() {
            self.loss_sum += loss;
            self.loss_n += 1;
        }
        if !step.is_multiple_of(self.every) && step != self.total {
            return None;
        }
        let elapsed = (wall - self.excluded).max(0.0);
        let done = step.saturating_sub(self.since_step) as f64;
        let steps_per_second = if elapsed > 0.0 { done / elapsed } else { 0.0 };
        let left = self.total.saturating_sub(step) as f64;
        let eta_seconds = if steps_per_second > 0.0 {
            (left / steps_per_second + self.overhead_left).ceil() as u64
        } else {
            0
        };
        let loss = if self.loss_n > 0 {
            self.loss_sum / self.loss_n as f64
        } else {
            f64::NAN
        };
        self.loss_sum = 0.0;
        self.loss_n = 0;
        self.since = Instant::now();
        self.since_step = step;
        self.excluded = 0.0;
        Some(TrainerEvent::Progress {
            step,
            total_steps: self.total,
            loss,
            steps_per_second,
            eta_seconds,
        })
    }
}

/// The summary as it goes into the termination-message file: at most 4 KiB, shortening the
/// error message (never the structure) when needed.
pub fn summary_json(summary: &TrainerSummary) -> String {
    let mut s = summary.clone();
    loop {
        let json = serde_json::to_string(&s).unwrap_or_else(|_| "{}".into());
        if json.len() <= MAX_SUMMARY_BYTES {
            return json;
        }
        match &mut s.error {
            Some(e) if e.len() > 16 => {
                let mut cut = e.len() - (json.len() - MAX_SUMMARY_BYTES).min(e.len() - 16) - 3;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
                e.push_str("...");
            }
            _ => {
                s.artifacts.truncate(s.artifacts.len().saturating_sub(1));
                if s.artifacts.is_empty() && s.error.as_ref().is_none_or(|e| e.len() <= 16) {
                    return serde_json::to_string(&s).unwrap_or_else(|_| "{}".into());
                }
            }
        }
    }
}

/// Writes the summary file.
pub fn write_summary(path: &Path, summary: &TrainerSummary) -> std::io::Result<()> {
    std::fs::write(path, summary_json(summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraplane_crds::trainer::Outcome;

    #[test]
    fn progress_lines_average_loss_and_estimate_eta() {
        let mut t = Tracker::new(100, 10, 0);
        for s in 1..10 {
            assert!(t.record_at(s, 1.0, 1.0).is_none());
        }
        let ev = t.record_at(10, 2.0, 5.0).unwrap();
        assert_eq!(
            ev,
            TrainerEvent::Progress {
                step: 10,
                total_steps: 100,
                loss: 1.1,
                steps_per_second: 2.0,
                eta_seconds: 45
            }
        );
        // The last step reports even off the interval.
        let mut t = Tracker::new(15, 10, 10);
        assert!(t.record_at(15, 0.5, 1.0).is_some());
    }

    #[test]
    fn sample_time_is_not_training_throughput_and_sets_to_come_count_in_the_eta() {
        let mut t = Tracker::new(100, 10, 0);
        // 30 s of wall time, 20 of them rendering a set; two more sets of 15 s to come.
        t.exclude(20.0, 30.0);
        let Some(TrainerEvent::Progress {
            steps_per_second,
            eta_seconds,
            ..
        }) = t.record_at(10, 1.0, 30.0)
        else {
            panic!("no progress line at step 10");
        };
        assert_eq!(steps_per_second, 1.0);
        assert_eq!(eta_seconds, 90 + 30);
        // The exclusion ends with its line; the sets to come stay in the estimate.
        let Some(TrainerEvent::Progress { eta_seconds, .. }) = t.record_at(20, 1.0, 10.0) else {
            panic!("no progress line at step 20");
        };
        assert_eq!(eta_seconds, 80 + 30);
    }

    #[test]
    fn summary_fits_four_kib() {
        let s = TrainerSummary {
            outcome: Outcome::Crashed,
            step: 3,
            artifacts: vec![],
            error: Some("é".repeat(5000)),
        };
        let json = summary_json(&s);
        assert!(json.len() <= MAX_SUMMARY_BYTES, "{}", json.len());
        let back: TrainerSummary = serde_json::from_str(&json).unwrap();
        assert_eq!(back.outcome, Outcome::Crashed);
        assert!(back.error.unwrap().ends_with("..."));
    }
}
