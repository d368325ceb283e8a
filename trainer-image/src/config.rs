//! Reading and checking the trainer's one input file (`TrainerConfig`, YAML or JSON).
//!
//! Every problem is reported as one line that names the offending key (`training.rank: ...`),
//! because that line ends up in the job's status where an operator reads it. Values of the
//! concept (trigger word, description) never appear in an error.

use std::path::Path;

use loraplane_crds::layout::{
    CHECKPOINT_FILE, MAX_SAMPLE_PROMPTS, MAX_SAMPLE_SETS, object_in, output_files, sample_files,
    sample_steps,
};
use loraplane_crds::trainer::TrainerConfig;
use loraplane_crds::v1alpha1::{FLUX_LORA_TARGETS, ModelFamily};

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    ReadFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid `TrainerConfig` (syntax, unknown key, wrong type).
    #[error("config key {key}: {message}")]
    ParseConfig {
        /// Dotted path of the offending key (`.` for the document itself).
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value parses but is out of range.
    #[error("config key {key}: {message}")]
    CheckValue {
        /// Dotted path of the offending key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// Reads, parses and checks a config file.
pub fn load(path: &Path) -> Result<TrainerConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.display().to_string(),
        source,
    })?;
    let config = parse(&text)?;
    check(&config)?;
    Ok(config)
}

/// Parses YAML or JSON text (JSON is YAML, but JSON gets serde_json's clearer messages).
pub fn parse(text: &str) -> Result<TrainerConfig, ConfigError> {
    let is_json = text.trim_start().starts_with('{');
    let result = if is_json {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let key = e.path().to_string();
            (key, one_line(&e.into_inner().to_string()))
        })
    } else {
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            (key, one_line(&e.into_inner().to_string()))
        })
    };
    result.map_err(|(key, message)| {
        // serde_yaml prefixes its message with the path; the key already says it.
        let message = match message.split_once(": ") {
            Some((head, rest)) if !head.contains(' ') && key.starts_with(head) => rest.to_string(),
            _ => message,
        };
        ConfigError::ParseConfig {
            // serde_path_to_error stops at the struct holding an unknown field; name the field.
            key: match unknown_field(&message) {
                Some(field) if key == "." => field.to_string(),
                Some(field) if !key.ends_with(field) => format!("{key}.{field}"),
                _ => key,
            },
            message,
        }
    })
}

fn one_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().to_string()
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Range checks serde cannot express.
pub fn check(c: &TrainerConfig) -> Result<(), ConfigError> {
    let t = &c.training;
    let bad = |key: &'static str, message: String| Err(ConfigError::CheckValue { key, message });
    if t.steps == 0 {
        return bad("training.steps", "must be at least 1".into());
    }
    if t.rank == 0 || t.rank > 1024 {
        return bad("training.rank", format!("must be 1..=1024, got {}", t.rank));
    }
    if !(t.alpha.is_finite() && t.alpha > 0.0) {
        return bad("training.alpha", format!("must be > 0, got {}", t.alpha));
    }
    if !(t.learning_rate.is_finite() && t.learning_rate > 0.0 && t.learning_rate < 1.0) {
        return bad(
            "training.learningRate",
            format!("must be in (0, 1), got {}", t.learning_rate),
        );
    }
    if t.lr_warmup_steps >= t.steps {
        return bad(
            "training.lrWarmupSteps",
            format!(
                "must be below steps ({}), got {}",
                t.steps, t.lr_warmup_steps
            ),
        );
    }
    if t.batch_size == 0 || t.batch_size > 64 {
        return bad(
            "training.batchSize",
            format!("must be 1..=64, got {}", t.batch_size),
        );
    }
    if t.resolution < 64 || t.resolution > 4096 || !t.resolution.is_multiple_of(64) {
        return bad(
            "training.resolution",
            format!(
                "must be a multiple of 64 in 64..=4096, got {}",
                t.resolution
            ),
        );
    }
    if t.checkpoint_every == 0 {
        return bad("training.checkpointEvery", "must be at least 1".into());
    }
    if !(t.noise_offset.is_finite() && (0.0..=1.0).contains(&t.noise_offset)) {
        return bad(
            "training.noiseOffset",
            format!("must be in [0, 1], got {}", t.noise_offset),
        );
    }
    if let Some(g) = t.min_snr_gamma
        && !(g.is_finite() && g > 0.0)
    {
        return bad("training.minSnrGamma", format!("must be > 0, got {g}"));
    }
    // Each noise process has its own knobs; one asked of the other family is a mistake.
    let flow = c.base_model.family == ModelFamily::Flux1;
    if flow && t.min_snr_gamma.is_some() {
        return bad(
            "training.minSnrGamma",
            "applies to the SD families only (flux1 weights every noise level alike)".into(),
        );
    }
    if let Some(targets) = &t.lora_targets {
        if !flow {
            return bad(
                "training.loraTargets",
                "applies to flux1 only (the SD families adapt a fixed set of layers)".into(),
            );
        }
        if targets.is_empty() {
            return bad(
                "training.loraTargets",
                "must name at least one layer".into(),
            );
        }
        if let Some(unknown) = targets
            .iter()
            .find(|t| !FLUX_LORA_TARGETS.contains(&t.as_str()))
        {
            return bad(
                "training.loraTargets",
                format!(
                    "{unknown:?} is not a FLUX.1 block layer (one of {})",
                    FLUX_LORA_TARGETS.join(", ")
                ),
            );
        }
    }
    if !flow && t.timestep_sampling.is_some() {
        return bad(
            "training.timestepSampling",
            "applies to flux1 only (SD families draw DDPM timesteps)".into(),
        );
    }
    if let Some(g) = t.guidance_scale
        && !(flow && g.is_finite() && (0.0..=30.0).contains(&g))
    {
        return bad(
            "training.guidanceScale",
            format!(
                "flux1 only, in [0, 30]; got {g} for {}",
                c.base_model.family.as_str()
            ),
        );
    }
    if c.log_every == 0 {
        return bad("logEvery", "must be at least 1".into());
    }
    let sha = &c.dataset.sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return bad("dataset.sha256", "must be 64 lowercase hex digits".into());
    }
    if c.concept.trigger_word.trim().is_empty() {
        return bad("concept.triggerWord", "must not be empty".into());
    }
    for (key, value) in [
        ("baseModel.path", &c.base_model.path),
        ("dataset.uri", &c.dataset.uri),
        ("checkpoints", &c.checkpoints),
        ("output", &c.output),
        ("workDir", &c.work_dir),
    ] {
        if value.trim().is_empty() {
            return bad(key, "must not be empty".into());
        }
    }
    // Every s3:// location must come with its grant, so a missing one fails here, before any
    // work, rather than after hours of training when the LoRA cannot be uploaded.
    let ck = object_in(&c.checkpoints, CHECKPOINT_FILE);
    let mut needed: Vec<(&str, String, bool)> = vec![
        ("dataset.uri", c.dataset.uri.clone(), false),
        ("checkpoints", ck, true),
    ];
    for (_, file) in output_files(&c.job.name) {
        needed.push(("output", object_in(&c.output, &file), true));
    }
    for (key, uri, put) in needed {
        let table = if put { &c.grants.put } else { &c.grants.get };
        if uri.starts_with("s3://") && !table.contains_key(&uri) {
            let method = if put { "PUT" } else { "GET" };
            return bad(key, format!("{uri} has no {method} grant"));
        }
    }
    let model = object_in(&c.base_model.path, "");
    if model.starts_with("s3://") && !c.grants.get.keys().any(|k| k.starts_with(&model)) {
        return bad("baseModel.path", "no object under it is granted".into());
    }
    check_samples(c)
}

/// The sample settings when samples are on: a few non-empty prompts, a sampler that ends, a
/// resolution the model takes, and for an `s3://` output a PUT grant for every sample file.
fn check_samples(c: &TrainerConfig) -> Result<(), ConfigError> {
    let s = &c.samples;
    if s.is_never() {
        return Ok(());
    }
    let bad = |key: &'static str, message: String| Err(ConfigError::CheckValue { key, message });
    if s.prompts.len() > MAX_SAMPLE_PROMPTS || s.prompts.iter().any(|p| p.trim().is_empty()) {
        return bad(
            "samples.prompts",
            format!("must be at most {MAX_SAMPLE_PROMPTS} non-empty prompts"),
        );
    }
    if s.steps == 0 || s.steps > 150 {
        return bad("samples.steps", format!("must be 1..=150, got {}", s.steps));
    }
    if !(s.guidance.is_finite() && (1.0..=30.0).contains(&s.guidance)) {
        return bad(
            "samples.guidance",
            format!("must be in [1, 30], got {}", s.guidance),
        );
    }
    if s.resolution != 0
        && (s.resolution < 64 || s.resolution > 2048 || !s.resolution.is_multiple_of(64))
    {
        return bad(
            "samples.resolution",
            format!(
                "must be 0 (the training resolution) or a multiple of 64 in 64..=2048, got {}",
                s.resolution
            ),
        );
    }
    let sets = sample_steps(c.training.steps, s.every).len();
    if sets > MAX_SAMPLE_SETS {
        return bad(
            "samples.every",
            format!("gives {sets} sample sets, at most {MAX_SAMPLE_SETS}"),
        );
    }
    let prompts = s
        .prompts_for(c.concept.concept_type, &c.concept.trigger_word)
        .len();
    for file in sample_files(c.training.steps, s.every, prompts) {
        let uri = object_in(&c.output, &file);
        if uri.starts_with("s3://") && !c.grants.put.contains_key(&uri) {
            return bad("samples", format!("{uri} has no PUT grant"));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"
job: {namespace: ns, name: j1, uid: u-1}
baseModel: {family: sd15, path: /models/sd15}
dataset: {uri: /data/set.zip, sha256: "0000000000000000000000000000000000000000000000000000000000000000"}
concept: {type: character, triggerWord: zqxperson, description: secret text}
training:
  steps: 10
  rank: 4
  alpha: 4
  learningRate: 0.0001
  lrScheduler: cosine
  lrWarmupSteps: 2
  batchSize: 1
  resolution: 64
  seed: 7
  checkpointEvery: 5
  mixedPrecision: fp32
checkpoints: /work/ckpt
output: /work/out
workDir: /work
"#;

    fn err_of(text: &str) -> String {
        match parse(text).and_then(|c| check(&c)) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sample_parses_as_yaml_and_json() {
        let c = parse(SAMPLE).unwrap();
        check(&c).unwrap();
        assert_eq!(c.training.rank, 4);
        assert_eq!(c.log_every, 10);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(parse(&json).unwrap(), c);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let text = SAMPLE.replace("  rank: 4\n", "  rank: 4\n  ranke: 5\n");
        let e = err_of(&text);
        assert!(
            e.starts_with("config key training.ranke: unknown field"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
        let e = err_of(&format!("{SAMPLE}bogus: 1\n"));
        assert!(e.starts_with("config key bogus: unknown field"), "{e}");
        let c = parse(SAMPLE).unwrap();
        let mut v = serde_json::to_value(&c).unwrap();
        v["training"]["lr"] = 1.into();
        let e = err_of(&v.to_string());
        assert!(
            e.starts_with("config key training.lr: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn invalid_values_are_named_and_secrets_stay_out() {
        let e = err_of(&SAMPLE.replace("resolution: 64", "resolution: 500"));
        assert!(e.contains("training.resolution"), "{e}");
        let e = err_of(&SAMPLE.replace("rank: 4", "rank: four"));
        assert!(e.contains("training.rank"), "{e}");
        let e = err_of(&SAMPLE.replace("family: sd15", "family: sd3"));
        assert!(e.contains("baseModel.family"), "{e}");
        let e = err_of(&SAMPLE.replace("lrWarmupSteps: 2", "lrWarmupSteps: 10"));
        assert!(e.contains("training.lrWarmupSteps"), "{e}");
        let e = err_of(&SAMPLE.replace(
            "lrWarmupSteps: 2",
            "lrWarmupSteps: 2\n  timestepSampling: fluxShift",
        ));
        assert!(e.contains("training.timestepSampling"), "{e}");
        let e =
            err_of(&SAMPLE.replace("lrWarmupSteps: 2", "lrWarmupSteps: 2\n  guidanceScale: 3.5"));
        assert!(e.contains("training.guidanceScale"), "{e}");
        let flux = SAMPLE.replace("family: sd15", "family: flux1");
        assert!(parse(&flux).is_ok());
        let targets = |list: &str| format!("lrWarmupSteps: 2\n  loraTargets: [{list}]");
        assert!(parse(&flux.replace("lrWarmupSteps: 2", &targets("attn.to_q, proj_mlp"))).is_ok());
        let e = err_of(&flux.replace("lrWarmupSteps: 2", &targets("attn.to_qq")));
        assert!(
            e.contains("training.loraTargets") && e.contains("attn.to_qq"),
            "{e}"
        );
        let e = err_of(&SAMPLE.replace("lrWarmupSteps: 2", &targets("attn.to_q")));
        assert!(e.contains("flux1 only"), "{e}");
        let e = err_of(&flux.replace("lrWarmupSteps: 2", "lrWarmupSteps: 2\n  minSnrGamma: 5"));
        assert!(e.contains("training.minSnrGamma"), "{e}");
        let e = err_of(&SAMPLE.replace("lrWarmupSteps: 2", "lrWarmupSteps: 10"));
        assert!(e.contains("training.lrWarmupSteps"), "{e}");
        let e = err_of(&SAMPLE.replace("sha256: \"0000", "sha256: \"ABCD"));
        assert!(e.contains("dataset.sha256"), "{e}");
        let e = err_of(&SAMPLE.replace("output: /work/out", "output: s3://b/out/"));
        assert!(e.contains("config key output"), "{e}");
        assert!(
            e.contains("s3://b/out/j1.safetensors has no PUT grant"),
            "{e}"
        );
        let granted = SAMPLE.replace("output: /work/out", "output: s3://b/out/")
            + "grants:\n  put:\n    s3://b/out/j1.safetensors: http://s3/one\n    s3://b/out/pytorch_lora_weights.safetensors: http://s3/two\n";
        assert_eq!(err_of(&granted), "");
        let e = err_of(&SAMPLE.replace("type: character", "type: 5"));
        assert!(e.contains("concept.type"), "{e}");
        assert!(!e.contains("zqxperson") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn sample_settings_are_checked_and_every_sample_file_needs_its_grant() {
        let on = format!("{SAMPLE}samples: {{when: checkpoints, every: 5}}\n");
        assert_eq!(err_of(&on), "");
        for (bad, key) in [
            ("prompts: [\"\"]", "samples.prompts"),
            ("steps: 0", "samples.steps"),
            ("guidance: 0.5", "samples.guidance"),
            ("resolution: 100", "samples.resolution"),
            ("prompts: [a, b, c, d, e, f, g, h, i]", "samples.prompts"),
        ] {
            let text = on.replace("every: 5}", &format!("every: 5, {bad}}}"));
            let e = err_of(&text);
            assert!(e.contains(key), "{bad}: {e}");
            assert!(!e.contains("zqxperson"), "{e}");
        }
        let many = on
            .replace("steps: 10\n", "steps: 1000\n")
            .replace("every: 5", "every: 1");
        assert!(err_of(&many).contains("samples.every"), "{}", err_of(&many));
        // An s3:// output with the LoRA granted but not the samples.
        let s3 = on.replace("output: /work/out", "output: s3://b/out/")
            + "grants:\n  put:\n    s3://b/out/j1.safetensors: http://s3/one\n    s3://b/out/pytorch_lora_weights.safetensors: http://s3/two\n";
        let e = err_of(&s3);
        assert!(
            e.contains("s3://b/out/samples/step-000000-0.png has no PUT grant"),
            "{e}"
        );
    }
}
