//! Rectified flow (flow matching), the noise process FLUX.1 was trained with, as pure numbers:
//! x_σ = (1 − σ)·x₀ + σ·ε, the model predicts the velocity ε − x₀, σ ∈ (0, 1].
//!
//! - Training draws σ per sample ([`FlowMatching::sample_sigma`]) the ways the common trainers
//!   do ([`TimestepSampling`]): uniform over the scheduler's training sigmas (diffusers'
//!   default), logit-normal (SD3), or logit-normal shifted by the resolution-dependent μ
//!   (kohya's `flux_shift`). Every σ weighs the same in the loss.
//! - Inference ([`FlowMatching::inference_sigmas`]) follows diffusers'
//!   `FlowMatchEulerDiscreteScheduler` as `FluxPipeline` drives it: `steps` sigmas from 1 down
//!   to 1/steps, shifted (dynamically by μ from the image's token count, or by the static
//!   `shift`), then 0.
//!
//! The constants come from the model's `scheduler/scheduler_config.json`.

use loraplane_crds::v1alpha1::TimestepSampling;

use crate::model::SchedulerConfig;
use crate::rng::Rng;
use crate::schedule::ScheduleError;

/// The flow-matching schedule of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatching {
    sampling: TimestepSampling,
    train_steps: usize,
    /// The static shift (used when `dynamic` is false).
    shift: f64,
    /// Shift by μ from the image's token count (FLUX.1-dev) rather than by `shift`.
    dynamic: bool,
    base_shift: f64,
    max_shift: f64,
    base_seq_len: f64,
    max_seq_len: f64,
}

impl FlowMatching {
    /// The schedule from the model's scheduler config, drawing training σ by `sampling`.
    pub fn new(c: &SchedulerConfig, sampling: TimestepSampling) -> Result<Self, ScheduleError> {
        let bad = |what: String| Err(ScheduleError::CheckSchedulerConfig(what));
        if !(2..=100_000).contains(&c.num_train_timesteps) {
            return bad(format!(
                "num_train_timesteps {} out of range",
                c.num_train_timesteps
            ));
        }
        if !(c.shift > 0.0 && c.shift.is_finite()) {
            return bad(format!("shift {} must be positive", c.shift));
        }
        if c.max_image_seq_len <= c.base_image_seq_len {
            return bad(format!(
                "max_image_seq_len {} must exceed base_image_seq_len {}",
                c.max_image_seq_len, c.base_image_seq_len
            ));
        }
        if let Some(kind) = c.time_shift_type.as_deref().filter(|k| *k != "exponential") {
            return bad(format!(
                "time_shift_type {kind:?} is not supported (exponential)"
            ));
        }
        Ok(Self {
            sampling,
            train_steps: c.num_train_timesteps,
            shift: c.shift,
            dynamic: c.use_dynamic_shifting,
            base_shift: c.base_shift,
            max_shift: c.max_shift,
            base_seq_len: c.base_image_seq_len as f64,
            max_seq_len: c.max_image_seq_len as f64,
        })
    }

    /// μ for an image of `tokens` packed latent tokens: linear from `base_shift` at
    /// `base_image_seq_len` to `max_shift` at `max_image_seq_len` (diffusers' `calculate_shift`).
    pub fn mu(&self, tokens: usize) -> f64 {
        let m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len);
        self.base_shift + m * (tokens as f64 - self.base_seq_len)
    }

    /// The noise level `sigma` shifted toward noise: by μ (`exp(μ) / (exp(μ) + 1/σ − 1)`,
    /// diffusers' exponential `time_shift`) when dynamic, else by the static shift
    /// (`s·σ / (1 + (s − 1)·σ)`).
    pub fn shifted(&self, sigma: f64, tokens: usize) -> f64 {
        if self.dynamic {
            time_shift(self.mu(tokens), sigma)
        } else {
            self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)
        }
    }

    /// diffusers' training sigmas: `k/N` for k = N..1 (descending), statically shifted unless
    /// the model shifts dynamically (then training sees them unshifted, as in diffusers).
    fn train_sigma(&self, index: usize) -> f64 {
        let n = self.train_steps;
        let s = (n - index.min(n - 1)) as f64 / n as f64;
        if self.dynamic {
            s
        } else {
            self.shift * s / (1.0 + (self.shift - 1.0) * s)
        }
    }

    /// A training noise level for an image of `tokens` packed tokens.
    pub fn sample_sigma(&self, rng: &mut Rng, tokens: usize) -> f64 {
        match self.sampling {
            TimestepSampling::Uniform => {
                self.train_sigma(rng.below(self.train_steps as u64) as usize)
            }
            TimestepSampling::LogitNormal => {
                // diffusers draws u, then picks the training sigma at index ⌊u·N⌋.
                let u = sigmoid(rng.normal());
                self.train_sigma((u * self.train_steps as f64) as usize)
            }
            TimestepSampling::FluxShift => time_shift(self.mu(tokens), sigmoid(rng.normal())),
        }
    }

    /// The sampler's noise levels for `steps` steps on an image of `tokens` packed tokens:
    /// `steps` values from 1 down, then 0.
    pub fn inference_sigmas(&self, steps: usize, tokens: usize) -> Vec<f64> {
        let steps = steps.max(1);
        let mut out: Vec<f64> = (0..steps)
            .map(|i| {
                // np.linspace(1, 1/steps, steps)
                let s = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / steps as f64 - 1.0) * i as f64 / (steps - 1) as f64
                };
                self.shifted(s, tokens)
            })
            .collect();
        out.push(0.0);
        out
    }
}

/// diffusers' exponential `time_shift(mu, 1, t)`.
pub fn time_shift(mu: f64, sigma: f64) -> f64 {
    let e = mu.exp();
    e / (e + (1.0 / sigma - 1.0))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The training target's coefficients: velocity = 1·ε − 1·x₀.
pub const TARGET: (f64, f64) = (1.0, -1.0);

/// The noisy input's coefficients (of x₀, of ε) at `sigma`.
pub fn input_coefficients(sigma: f64) -> (f64, f64) {
    (1.0 - sigma, sigma)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FLUX.1-dev's published `scheduler_config.json`.
    fn dev() -> SchedulerConfig {
        serde_json::from_str(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": true}"#,
        )
        .unwrap_or_default()
    }

    fn flow(sampling: TimestepSampling) -> FlowMatching {
        FlowMatching::new(&dev(), sampling).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn mu_is_diffusers_calculate_shift() {
        let f = flow(TimestepSampling::Uniform);
        assert!((f.mu(256) - 0.5).abs() < 1e-12);
        assert!((f.mu(4096) - 1.15).abs() < 1e-12);
        // 1024 px: 64 x 64 packed tokens.
        assert!((f.mu(4096 / 4 * 4) - 1.15).abs() < 1e-12);
        assert!((f.mu(1024) - (0.5 + 0.65 * 768.0 / 3840.0)).abs() < 1e-12);
    }

    #[test]
    fn inference_sigmas_are_flux_pipelines() {
        // FluxPipeline at 1024 px (4096 tokens), 4 steps: linspace(1, 0.25, 4) shifted by
        // μ = 1.15, then 0. Values from diffusers 0.42.1.
        let f = flow(TimestepSampling::Uniform);
        let s = f.inference_sigmas(4, 4096);
        let want = [1.0, 0.904_530_76, 0.759_510_93, 0.512_844_15, 0.0];
        assert_eq!(s.len(), want.len());
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{s:?}");
        }
        // A static shift (schnell-like config, no dynamic shifting, shift 1): plain linspace.
        let mut c = dev();
        c.use_dynamic_shifting = false;
        c.shift = 1.0;
        let s = FlowMatching::new(&c, TimestepSampling::Uniform)
            .unwrap_or_else(|e| panic!("{e}"))
            .inference_sigmas(2, 16);
        assert_eq!(s, vec![1.0, 0.5, 0.0]);
    }

    #[test]
    fn training_sigmas_stay_in_range_and_each_sampling_has_its_shape() {
        let mut rng = Rng::new(7, 0);
        let mean = |f: &FlowMatching, rng: &mut Rng, tokens| {
            let draws: Vec<f64> = (0..4000).map(|_| f.sample_sigma(rng, tokens)).collect();
            assert!(draws.iter().all(|s| *s > 0.0 && *s <= 1.0));
            draws.iter().sum::<f64>() / draws.len() as f64
        };
        let uniform = mean(&flow(TimestepSampling::Uniform), &mut rng, 4096);
        assert!((uniform - 0.5).abs() < 0.02, "{uniform}");
        let logit = mean(&flow(TimestepSampling::LogitNormal), &mut rng, 4096);
        assert!((logit - 0.5).abs() < 0.02, "{logit}");
        // The shift moves σ toward noise, more so for larger images.
        let small = mean(&flow(TimestepSampling::FluxShift), &mut rng, 256);
        let large = mean(&flow(TimestepSampling::FluxShift), &mut rng, 4096);
        assert!(small > 0.55 && large > small + 0.05, "{small} {large}");
    }

    #[test]
    fn unusable_configs_are_refused_naming_the_key() {
        let mut c = dev();
        c.time_shift_type = Some("linear".into());
        let e = FlowMatching::new(&c, TimestepSampling::Uniform).unwrap_err();
        assert!(e.to_string().contains("time_shift_type"), "{e}");
        let mut c = dev();
        c.shift = 0.0;
        assert!(FlowMatching::new(&c, TimestepSampling::Uniform).is_err());
    }

    #[test]
    fn the_noisy_input_and_target_are_rectified_flows() {
        assert_eq!(input_coefficients(0.25), (0.75, 0.25));
        assert_eq!(TARGET, (1.0, -1.0));
    }
}
