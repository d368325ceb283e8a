//! Training progress from the trainer's log lines (`LORAPLANE {json}`, see
//! `loraplane_crds::trainer`), merged into `status.progress`.
//!
//! Why the pod log: the training pod is locked down (no service-account token, no inbound
//! port the operator could poll, and it must not be given credentials to write anything but its
//! own checkpoints). Its stdout is already collected by the kubelet and readable through the
//! `pods/log` subresource with the operator's ordinary RBAC, on any conformant cluster, with no
//! extra moving part. Reading only the last lines (`tailLines`) bounds the cost per poll; the
//! newest checkpoint step is kept in status, so a checkpoint line scrolling out of the tail loses
//! nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use loraplane_crds::layout::{
    CONTACT_SHEET_FILE, MAX_SAMPLE_PROMPTS, MAX_SAMPLE_SETS, object_in, sample_file,
};
use loraplane_crds::trainer::TrainerEvent;
use loraplane_crds::v1alpha1::{Progress, SampleArtifact, SampleKind};

/// Lines read from the end of a running trainer's log on each poll. The trainer prints a
/// progress line every `logEvery` (10) steps and checkpoints every 100 steps by default, so
/// this window normally holds the latest checkpoint line too.
pub const TAIL_LINES: i64 = 50;

/// What a log tail says about training.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogProgress {
    /// The newest progress report: (step, total, loss, eta seconds).
    pub latest: Option<(u64, u64, f64, u64)>,
    /// The newest checkpoint step seen.
    pub checkpoint: Option<u64>,
    /// The step the run resumed from, if it said so.
    pub resumed_from: Option<u64>,
    /// The sample sets seen, as (step, images), in the order they were reported.
    pub samples: Vec<(u64, u32)>,
}

/// Parses a log tail; lines that are not trainer events are ignored.
pub fn parse_log(text: &str) -> LogProgress {
    let mut out = LogProgress::default();
    for line in text.lines() {
        match TrainerEvent::parse_line(line) {
            Some(TrainerEvent::Progress {
                step,
                total_steps,
                loss,
                eta_seconds,
                ..
            }) => out.latest = Some((step, total_steps, loss, eta_seconds)),
            Some(TrainerEvent::Checkpoint { step, .. }) => {
                out.checkpoint = Some(out.checkpoint.map_or(step, |c| c.max(step)));
            }
            Some(TrainerEvent::Resumed { step }) => out.resumed_from = Some(step),
            Some(TrainerEvent::Samples { step, images, .. }) => out.samples.push((step, images)),
            None => {}
        }
    }
    out
}

/// `450/1000 45%`, the `kubectl get ltj` Progress column.
pub fn summary(step: i64, total: i64) -> String {
    let pct = if total > 0 {
        (step.clamp(0, total) * 100) / total
    } else {
        0
    };
    format!("{step}/{total} {pct}%")
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Merges a log tail into the previous progress. Returns the previous value unchanged when the
/// tail says nothing new, so a status write is not triggered by a mere poll.
pub fn merge(
    previous: Option<&Progress>,
    log: &LogProgress,
    total_steps: i64,
    now: Timestamp,
) -> Option<Progress> {
    let mut p = previous.cloned().unwrap_or(Progress {
        total_steps,
        ..Progress::default()
    });
    let before = p.clone();
    if let Some((step, total, loss, eta)) = log.latest {
        p.step = to_i64(step);
        p.total_steps = to_i64(total);
        p.loss = Some(loss);
        p.eta_seconds = Some(to_i64(eta));
    }
    let resumed = log.resumed_from.map(to_i64);
    if let Some(step) = log.checkpoint.map(to_i64).or(resumed) {
        p.last_checkpoint_step = Some(p.last_checkpoint_step.map_or(step, |s| s.max(step)));
    }
    // A checkpoint at step N (or resuming from one) means N steps are done, even before the
    // trainer's next progress line says so; the status never shows less than its checkpoint.
    if let Some(done) = log.checkpoint.map(to_i64).or(resumed) {
        p.step = p.step.max(done);
    }
    p.summary = Some(summary(p.step, p.total_steps));
    if previous.is_some() && p == before {
        return previous.cloned();
    }
    p.last_report_time = Some(Time(now));
    Some(p)
}

/// The job's sample artifacts after a log tail: `previous` plus each image of the sets the
/// tail reports that are not recorded yet (named by the shared layout under `output_prefix`,
/// where the trainer wrote them), and the contact sheet at the newest set. `None` when nothing
/// is new, so a poll alone writes no status. What a trainer reports is bounded like anything
/// else it says: steps beyond `total_steps`, more images than a set can have and sets beyond
/// the most a job can have are not recorded.
pub fn merge_samples(
    previous: &[SampleArtifact],
    sets: &[(u64, u32)],
    output_prefix: &str,
    total_steps: i64,
) -> Option<Vec<SampleArtifact>> {
    let recorded = |step: i64| {
        previous
            .iter()
            .any(|a| a.kind == SampleKind::Image && a.step == step)
    };
    let mut images: Vec<SampleArtifact> = previous
        .iter()
        .filter(|a| a.kind == SampleKind::Image)
        .cloned()
        .collect();
    let mut sheet = previous
        .iter()
        .find(|a| a.kind == SampleKind::ContactSheet)
        .cloned();
    let mut changed = false;
    let mut recorded_sets = previous
        .iter()
        .filter(|a| a.kind == SampleKind::Image && a.prompt == Some(0))
        .count();
    for &(step, count) in sets {
        let at = to_i64(step);
        if recorded(at) || at > total_steps || recorded_sets >= MAX_SAMPLE_SETS {
            continue;
        }
        recorded_sets += 1;
        let count = count.min(MAX_SAMPLE_PROMPTS as u32);
        changed = true;
        images.extend((0..count).map(|i| SampleArtifact {
            kind: SampleKind::Image,
            step: at,
            prompt: i32::try_from(i).ok(),
            uri: object_in(output_prefix, &sample_file(step, i as usize)),
        }));
        if sheet.as_ref().is_none_or(|s| s.step <= at) {
            sheet = Some(SampleArtifact {
                kind: SampleKind::ContactSheet,
                step: at,
                prompt: None,
                uri: object_in(output_prefix, CONTACT_SHEET_FILE),
            });
        }
    }
    if !changed {
        return None;
    }
    images.sort_by_key(|a| (a.step, a.prompt));
    images.extend(sheet);
    Some(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ev: TrainerEvent) -> String {
        ev.to_line()
    }

    fn set(step: u64) -> String {
        line(TrainerEvent::Samples {
            step,
            images: 2,
            seconds: 1.5,
        })
    }

    #[test]
    fn sample_sets_become_images_by_step_and_prompt_and_one_contact_sheet() {
        let prefix = "s3://outputs-eu/ns/job-uid";
        let log = parse_log(&format!("{}\nnoise\n{}\n", set(0), set(100)));
        assert_eq!(log.samples, [(0, 2), (100, 2)]);
        let first = merge_samples(&[], &log.samples, prefix, 1000).unwrap();
        let names: Vec<(SampleKind, i64, Option<i32>, &str)> = first
            .iter()
            .map(|a| (a.kind, a.step, a.prompt, a.uri.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                (
                    SampleKind::Image,
                    0,
                    Some(0),
                    "s3://outputs-eu/ns/job-uid/samples/step-000000-0.png"
                ),
                (
                    SampleKind::Image,
                    0,
                    Some(1),
                    "s3://outputs-eu/ns/job-uid/samples/step-000000-1.png"
                ),
                (
                    SampleKind::Image,
                    100,
                    Some(0),
                    "s3://outputs-eu/ns/job-uid/samples/step-000100-0.png"
                ),
                (
                    SampleKind::Image,
                    100,
                    Some(1),
                    "s3://outputs-eu/ns/job-uid/samples/step-000100-1.png"
                ),
                (
                    SampleKind::ContactSheet,
                    100,
                    None,
                    "s3://outputs-eu/ns/job-uid/samples/contact-sheet.png"
                ),
            ]
        );
        // The same tail again: nothing new, no status write.
        assert_eq!(merge_samples(&first, &log.samples, prefix, 1000), None);
        // The next tail has scrolled past the first sets; they stay recorded.
        let next = parse_log(&set(200));
        let second = merge_samples(&first, &next.samples, prefix, 1000).unwrap();
        assert_eq!(second.len(), 6 + 1);
        assert_eq!(second[4].step, 200);
        let sheet = second.last().unwrap();
        assert_eq!((sheet.kind, sheet.step), (SampleKind::ContactSheet, 200));
        // A trainer claiming a step past the end, or a set of a billion images, is bounded.
        let lies = [(5000, 2), (300, u32::MAX)];
        let bounded = merge_samples(&second, &lies, prefix, 1000).unwrap();
        assert_eq!(
            bounded.len(),
            second.len() + MAX_SAMPLE_PROMPTS,
            "{bounded:?}"
        );
    }

    #[test]
    fn the_newest_progress_and_checkpoint_win_and_noise_is_ignored() {
        let text = [
            line(TrainerEvent::Resumed { step: 100 }),
            "warning: something unrelated".to_string(),
            line(TrainerEvent::Progress {
                step: 440,
                total_steps: 1000,
                loss: 0.3,
                steps_per_second: 2.0,
                eta_seconds: 280,
            }),
            line(TrainerEvent::Checkpoint {
                step: 400,
                uri: "s3://c/j/400".into(),
            }),
            line(TrainerEvent::Progress {
                step: 450,
                total_steps: 1000,
                loss: 0.25,
                steps_per_second: 2.0,
                eta_seconds: 275,
            }),
        ]
        .join("\n");
        let log = parse_log(&text);
        assert_eq!(log.latest, Some((450, 1000, 0.25, 275)));
        assert_eq!(log.checkpoint, Some(400));
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let p = merge(None, &log, 1000, now).unwrap();
        assert_eq!(p.summary.as_deref(), Some("450/1000 45%"));
        assert_eq!(p.last_checkpoint_step, Some(400));
        assert_eq!(p.eta_seconds, Some(275));
    }

    #[test]
    fn a_checkpoint_that_scrolled_out_of_the_tail_is_not_forgotten() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let previous = Progress {
            step: 450,
            total_steps: 1000,
            last_checkpoint_step: Some(400),
            summary: Some("450/1000 45%".into()),
            ..Progress::default()
        };
        let log = parse_log(&line(TrainerEvent::Progress {
            step: 460,
            total_steps: 1000,
            loss: 0.2,
            steps_per_second: 2.0,
            eta_seconds: 270,
        }));
        let p = merge(Some(&previous), &log, 1000, now).unwrap();
        assert_eq!((p.step, p.last_checkpoint_step), (460, Some(400)));
        // Nothing new: the previous value comes back untouched (no status write).
        let same = merge(Some(&p), &log, 1000, now).unwrap();
        assert_eq!(same, p);
        assert_eq!(summary(0, 0), "0/0 0%");
    }

    #[test]
    fn a_checkpoint_ahead_of_the_last_progress_line_moves_the_step() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let log = parse_log(&line(TrainerEvent::Checkpoint {
            step: 5,
            uri: "s3://c/j/5".into(),
        }));
        let p = merge(None, &log, 40, now).unwrap();
        assert_eq!((p.step, p.last_checkpoint_step), (5, Some(5)));
        assert_eq!(p.summary.as_deref(), Some("5/40 12%"));
    }
}
