//! The kubelets' configuration and rules, without I/O: how a container runs (scripted or as
//! a local process), the script annotation, the trainer-style lines a script prints, and how
//! a local process's argv, env and paths are derived from the container spec.
//!
//! Local-process path rewriting: a process on the host cannot see a container's mount
//! namespace, so every volumeMount's `mountPath` (and the `terminationMessagePath`) is mapped
//! to a host directory, and each occurrence of such a path in the command, args, env values,
//! `workingDir` and the text files written from Secret/ConfigMap volumes is replaced by the
//! host path. An occurrence counts only at a path boundary: it starts the string or follows a
//! character that cannot be part of a path (`=`, `:`, space, quote...), and ends the string or
//! is followed by `/` or such a character. Longer mount paths win over their prefixes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use loraplane_crds::trainer::{Outcome, TrainerEvent, TrainerSummary};

/// Annotation overriding a pod's script: `duration=3s,exit=0,progress=10,message=...`
/// (`message` must come last; it takes the rest of the value).
pub const ANNOTATION_SCRIPT: &str = "kube-sim.loraplane.io/script";

/// What a scripted container does.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    /// How long it runs; `None` runs until the pod is deleted or its node fails.
    pub duration: Option<Duration>,
    /// Its exit code.
    pub exit_code: i32,
    /// Trainer-style progress: print this many `LORAPLANE {"event":"progress",...}` lines
    /// spread over the duration, and (unless `termination_message` is set) leave a
    /// `TrainerSummary` matching the exit code as the termination message. 0: none.
    pub progress_steps: u64,
    /// Extra lines printed at start.
    pub log_lines: Vec<String>,
    /// The termination message.
    pub termination_message: Option<String>,
}

impl Default for Script {
    /// One second, exit 0, silent.
    fn default() -> Self {
        Script {
            duration: Some(Duration::from_secs(1)),
            exit_code: 0,
            progress_steps: 0,
            log_lines: Vec::new(),
            termination_message: None,
        }
    }
}

/// A script for the containers whose image matches a glob (`*`, `?`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptRule {
    /// Image glob, e.g. `ghcr.io/loraplane/trainer:*`.
    pub image: String,
    /// What matching containers do.
    pub script: Script,
}

/// Runs containers whose image matches a glob as local processes.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalImage {
    /// Image glob.
    pub image: String,
    /// The image's entrypoint on this host, e.g. `["/bin/sh", "-c"]` or
    /// `["/path/to/loraplane-trainer"]`. The process's argv is this followed by the
    /// container's `args`; when the container sets `command`, its first element (the
    /// executable inside the image) is replaced by `entrypoint[0]` and the rest kept.
    pub entrypoint: Vec<String>,
}

/// How the simulated kubelets run containers.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Where per-claim volume directories and local-process working files live
    /// (`claims/{namespace}/{claim}/{uid}/`, `pods/{uid}/`). Default: a fresh directory under
    /// the system temp dir, deleted when the cluster is dropped.
    pub data_dir: Option<PathBuf>,
    /// Images run as local processes (checked after the script annotation, before `scripts`).
    pub local_images: Vec<LocalImage>,
    /// Scripts by image glob; the first match wins.
    pub scripts: Vec<ScriptRule>,
    /// The script of containers no rule matches.
    pub default_script: Script,
    /// Upper bound of the grace period on spot preemption (a cloud gives about 2 minutes;
    /// tests want less). Default 5 s.
    pub shutdown_grace_period: Duration,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        KubeletConfig {
            data_dir: None,
            local_images: Vec::new(),
            scripts: Vec::new(),
            default_script: Script::default(),
            shutdown_grace_period: Duration::from_secs(5),
        }
    }
}

/// How one container runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Scripted.
    Scripted(Script),
    /// As a local process with this entrypoint.
    Local(Vec<String>),
}

/// Glob match with `*` (any run of characters) and `?` (one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Parses a duration like `3s`, `500ms`, `2m`, `1h` or `forever`.
pub fn parse_duration(s: &str) -> Option<Option<Duration>> {
    let s = s.trim();
    if s == "forever" || s == "never" {
        return Some(None);
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok().map(Some)
}

/// Parses the script annotation; unknown keys or bad values are errors naming them.
pub fn parse_script(value: &str, base: &Script) -> Result<Script, String> {
    let mut script = base.clone();
    let mut rest = value.trim();
    while !rest.is_empty() {
        let (item, next) = if rest.starts_with("message=") {
            (rest, "")
        } else {
            match rest.split_once(',') {
                Some((a, b)) => (a, b),
                None => (rest, ""),
            }
        };
        rest = next.trim_start();
        let (key, val) = item
            .split_once('=')
            .ok_or_else(|| format!("{ANNOTATION_SCRIPT}: {item:?} is not key=value"))?;
        let bad = || format!("{ANNOTATION_SCRIPT}: bad value {val:?} for {key}");
        match key.trim() {
            "duration" => script.duration = parse_duration(val).ok_or_else(bad)?,
            "exit" => script.exit_code = val.trim().parse().map_err(|_| bad())?,
            "progress" => script.progress_steps = val.trim().parse().map_err(|_| bad())?,
            "message" => script.termination_message = Some(val.to_string()),
            other => return Err(format!("{ANNOTATION_SCRIPT}: unknown key {other:?}")),
        }
    }
    Ok(script)
}

/// Chooses how a container runs: the pod's script annotation, else the first matching local
/// image, else the first matching script rule, else the default script. An unparsable
/// annotation fails the container with the returned message.
pub fn choose_mode(
    pod: &Pod,
    container: &Container,
    config: &KubeletConfig,
) -> Result<Mode, String> {
    let image = container.image.as_deref().unwrap_or("");
    let rule_script = config
        .scripts
        .iter()
        .find(|r| glob_match(&r.image, image))
        .map(|r| &r.script)
        .unwrap_or(&config.default_script);
    if let Some(value) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SCRIPT))
    {
        return parse_script(value, rule_script).map(Mode::Scripted);
    }
    if let Some(local) = config
        .local_images
        .iter()
        .find(|l| glob_match(&l.image, image))
    {
        return Ok(Mode::Local(local.entrypoint.clone()));
    }
    Ok(Mode::Scripted(rule_script.clone()))
}

/// The lines a script prints and when (offset from start), and its termination message.
pub fn script_output(script: &Script) -> (Vec<(Duration, String)>, Option<String>) {
    let mut lines: Vec<(Duration, String)> = script
        .log_lines
        .iter()
        .map(|l| (Duration::ZERO, l.clone()))
        .collect();
    let total = script.progress_steps;
    let span = script.duration.unwrap_or(Duration::from_secs(total));
    for step in 1..=total {
        let at = span.mul_f64(step as f64 / total as f64);
        let left = span.saturating_sub(at);
        let event = TrainerEvent::Progress {
            step,
            total_steps: total,
            loss: 0.2 + 0.8 / (step as f64 + 1.0),
            steps_per_second: total as f64 / span.as_secs_f64().max(1e-3),
            eta_seconds: left.as_secs(),
        };
        lines.push((at, event.to_line()));
    }
    let message = script.termination_message.clone().or_else(|| {
        (total > 0).then(|| {
            let (outcome, error) = match script.exit_code {
                0 => (Outcome::Succeeded, None),
                loraplane_crds::trainer::EXIT_BAD_INPUT => {
                    (Outcome::BadInput, Some("scripted bad input".to_string()))
                }
                _ => (Outcome::Crashed, Some("scripted crash".to_string())),
            };
            let summary = TrainerSummary {
                outcome,
                step: if script.exit_code == 0 {
                    total
                } else {
                    total / 2
                },
                artifacts: Vec::new(),
                error,
            };
            serde_json::to_string(&summary).unwrap_or_default()
        })
    });
    (lines, message)
}

/// The process's argv (see [`LocalImage::entrypoint`]).
pub fn local_argv(entrypoint: &[String], container: &Container) -> Vec<String> {
    let args = container.args.iter().flatten().cloned();
    match container.command.as_deref() {
        Some([_, rest @ ..]) => entrypoint
            .iter()
            .take(1)
            .cloned()
            .chain(rest.iter().cloned())
            .chain(args)
            .collect(),
        _ => entrypoint.iter().cloned().chain(args).collect(),
    }
}

/// Container paths → host paths, longest container path first.
#[derive(Debug, Clone, Default)]
pub struct PathMap {
    entries: Vec<(String, PathBuf)>,
}

impl PathMap {
    /// Adds a mapping (`/` and empty paths are ignored: they would rewrite everything).
    pub fn add(&mut self, container_path: &str, host: &Path) {
        let p = container_path.trim_end_matches('/');
        if p.is_empty() {
            return;
        }
        self.entries.retain(|(c, _)| c != p);
        self.entries.push((p.to_string(), host.to_path_buf()));
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
    }

    /// The host path a container path maps to, if under a mapping.
    pub fn host_path(&self, container_path: &str) -> Option<PathBuf> {
        self.entries.iter().find_map(|(c, h)| {
            let rest = container_path.strip_prefix(c.as_str())?;
            if rest.is_empty() {
                Some(h.clone())
            } else {
                rest.strip_prefix('/').map(|r| h.join(r))
            }
        })
    }

    /// Rewrites every mapped path in `s` (see the module docs for the boundary rule).
    pub fn rewrite(&self, s: &str) -> String {
        let is_path_char = |c: char| c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
        let mut out = String::with_capacity(s.len());
        let mut i = 0;
        let mut prev: Option<char> = None;
        'scan: while i < s.len() {
            if prev.is_none_or(|c| !is_path_char(c)) {
                for (c, h) in &self.entries {
                    if let Some(after) = s[i..].strip_prefix(c.as_str()) {
                        let next = after.chars().next();
                        if next.is_none_or(|n| n == '/' || !is_path_char(n)) {
                            out.push_str(&h.to_string_lossy());
                            i += c.len();
                            prev = c.chars().last();
                            continue 'scan;
                        }
                    }
                }
            }
            let Some(ch) = s[i..].chars().next() else {
                break;
            };
            out.push(ch);
            i += ch.len_utf8();
            prev = Some(ch);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "ghcr.io/loraplane/trainer:*",
            "ghcr.io/loraplane/trainer:1.2"
        ));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("busy?ox*", "busybox:1.36"));
        assert!(!glob_match("ghcr.io/*/trainer", "ghcr.io/x/trainer:1"));
        assert!(glob_match("*trainer*", "ghcr.io/x/trainer:1"));
    }

    #[test]
    fn script_annotation_overrides_the_rule() {
        let base = Script::default();
        let s = parse_script(
            "duration=3s,exit=2,progress=4,message=bad input, really",
            &base,
        )
        .unwrap();
        assert_eq!(s.duration, Some(Duration::from_secs(3)));
        assert_eq!(s.exit_code, 2);
        assert_eq!(s.progress_steps, 4);
        assert_eq!(s.termination_message.as_deref(), Some("bad input, really"));
        assert_eq!(
            parse_script("duration=forever", &base).unwrap().duration,
            None
        );
        assert_eq!(
            parse_script("duration=250ms", &base).unwrap().duration,
            Some(Duration::from_millis(250))
        );
        assert!(
            parse_script("exit=x", &base)
                .unwrap_err()
                .contains("bad value \"x\" for exit")
        );
        assert!(
            parse_script("speed=9", &base)
                .unwrap_err()
                .contains("unknown key \"speed\"")
        );
    }

    #[test]
    fn mode_precedence_annotation_then_local_then_rule() {
        let config = KubeletConfig {
            scripts: vec![ScriptRule {
                image: "trainer:*".into(),
                script: Script {
                    exit_code: 7,
                    ..Script::default()
                },
            }],
            local_images: vec![LocalImage {
                image: "busybox*".into(),
                entrypoint: vec!["/bin/sh".into(), "-c".into()],
            }],
            ..KubeletConfig::default()
        };
        let pod = |ann: Option<&str>| {
            let mut p = Pod::default();
            if let Some(a) = ann {
                p.metadata.annotations =
                    Some([(ANNOTATION_SCRIPT.to_string(), a.to_string())].into());
            }
            p
        };
        let c = |image: &str| Container {
            image: Some(image.into()),
            ..Container::default()
        };
        assert!(
            matches!(choose_mode(&pod(None), &c("trainer:1"), &config), Ok(Mode::Scripted(s)) if s.exit_code == 7)
        );
        assert!(
            matches!(choose_mode(&pod(None), &c("busybox"), &config), Ok(Mode::Local(e)) if e[0] == "/bin/sh")
        );
        assert!(
            matches!(choose_mode(&pod(None), &c("other"), &config), Ok(Mode::Scripted(s)) if s == Script::default())
        );
        // The annotation starts from the rule's script and wins over a local mapping.
        assert!(
            matches!(choose_mode(&pod(Some("duration=2s")), &c("trainer:1"), &config),
            Ok(Mode::Scripted(s)) if s.exit_code == 7 && s.duration == Some(Duration::from_secs(2)))
        );
        assert!(
            matches!(choose_mode(&pod(Some("exit=1")), &c("busybox"), &config), Ok(Mode::Scripted(s)) if s.exit_code == 1)
        );
    }

    #[test]
    fn trainer_style_script_prints_progress_and_a_summary() {
        let s = Script {
            duration: Some(Duration::from_secs(4)),
            progress_steps: 4,
            exit_code: 2,
            ..Script::default()
        };
        let (lines, message) = script_output(&s);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[3].0, Duration::from_secs(4));
        let Some(TrainerEvent::Progress {
            step, total_steps, ..
        }) = TrainerEvent::parse_line(&lines[1].1)
        else {
            panic!("not a progress line: {}", lines[1].1);
        };
        assert_eq!((step, total_steps), (2, 4));
        let summary: TrainerSummary = serde_json::from_str(&message.unwrap()).unwrap();
        assert_eq!(summary.outcome, Outcome::BadInput);
        assert_eq!(script_output(&Script::default()), (vec![], None));
    }

    #[test]
    fn argv_replaces_the_image_executable() {
        let sh = vec!["/bin/sh".to_string(), "-c".to_string()];
        let c = Container {
            args: Some(vec!["echo hi".into()]),
            ..Container::default()
        };
        assert_eq!(local_argv(&sh, &c), ["/bin/sh", "-c", "echo hi"]);
        let c = Container {
            command: Some(vec!["sh".into(), "-c".into()]),
            args: Some(vec!["echo hi".into()]),
            ..Container::default()
        };
        assert_eq!(local_argv(&sh, &c), ["/bin/sh", "-c", "echo hi"]);
        let trainer = vec!["/opt/bin/trainer".to_string()];
        let c = Container {
            command: Some(vec![
                "/usr/local/bin/loraplane-trainer".into(),
                "train".into(),
            ]),
            args: Some(vec!["--config".into(), "/etc/job/config.yaml".into()]),
            ..Container::default()
        };
        assert_eq!(
            local_argv(&trainer, &c),
            [
                "/opt/bin/trainer",
                "train",
                "--config",
                "/etc/job/config.yaml"
            ]
        );
    }

    #[test]
    fn mount_paths_are_rewritten_at_path_boundaries_only() {
        let mut m = PathMap::default();
        m.add("/data", Path::new("/tmp/sim/claims/ns/work"));
        m.add("/data/cache/", Path::new("/tmp/sim/pods/u/cache"));
        m.add("/dev/termination-log", Path::new("/tmp/sim/pods/u/c.term"));
        assert_eq!(
            m.rewrite("/data/out.txt"),
            "/tmp/sim/claims/ns/work/out.txt"
        );
        assert_eq!(m.rewrite("/data/cache/x"), "/tmp/sim/pods/u/cache/x");
        assert_eq!(m.rewrite("--work=/data"), "--work=/tmp/sim/claims/ns/work");
        assert_eq!(
            m.rewrite("cat /data/a > /dev/termination-log; ls /database /x/data"),
            "cat /tmp/sim/claims/ns/work/a > /tmp/sim/pods/u/c.term; ls /database /x/data"
        );
        assert_eq!(
            m.rewrite("workDir: \"/data\"\n"),
            "workDir: \"/tmp/sim/claims/ns/work\"\n"
        );
        assert_eq!(
            m.host_path("/data/cache/y"),
            Some(PathBuf::from("/tmp/sim/pods/u/cache/y"))
        );
        assert_eq!(m.host_path("/datum"), None);
        m.add("/", Path::new("/nope"));
        assert_eq!(m.rewrite("/etc/passwd"), "/etc/passwd");
    }
}
