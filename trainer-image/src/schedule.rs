//! The numbers that drive training, apart from tensors: the DDPM noise schedule (betas from
//! the model's `scheduler/scheduler_config.json`), training targets for epsilon and
//! v-prediction, min-SNR-γ loss weights, and the learning-rate schedule (constant or cosine,
//! each with linear warmup). Formulas follow diffusers so that a run here and a run there agree.

use loraplane_crds::v1alpha1::LrScheduler;

pub use crate::model::{PredictionType, SchedulerConfig};

/// Why the scheduler config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A value is outside what the trainer supports.
    #[error("scheduler config: {0}")]
    CheckSchedulerConfig(String),
}

/// The DDPM forward process: ᾱ_t for every timestep.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
    /// What the model predicts.
    pub prediction: PredictionType,
}

impl NoiseSchedule {
    /// Builds the schedule from a scheduler config.
    pub fn new(c: &SchedulerConfig) -> Result<NoiseSchedule, ScheduleError> {
        let n = c.num_train_timesteps;
        if !(2..=100_000).contains(&n) {
            return Err(ScheduleError::CheckSchedulerConfig(format!(
                "num_train_timesteps {n} out of range"
            )));
        }
        if !(c.beta_start > 0.0 && c.beta_end < 1.0 && c.beta_start <= c.beta_end) {
            return Err(ScheduleError::CheckSchedulerConfig(format!(
                "betas {}..{} out of range",
                c.beta_start, c.beta_end
            )));
        }
        let lerp = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / (n - 1) as f64;
        let betas: Vec<f64> = match c.beta_schedule.as_str() {
            "linear" => (0..n).map(|i| lerp(c.beta_start, c.beta_end, i)).collect(),
            "scaled_linear" => (0..n)
                .map(|i| lerp(c.beta_start.sqrt(), c.beta_end.sqrt(), i).powi(2))
                .collect(),
            "squaredcos_cap_v2" => {
                // Glide's cosine schedule, betas capped at 0.999 as in diffusers.
                let ab = |x: f64| {
                    ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - ab(t2) / ab(t1)).min(0.999)
                    })
                    .collect()
            }
            other => {
                return Err(ScheduleError::CheckSchedulerConfig(format!(
                    "beta_schedule {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
                )));
            }
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Ok(NoiseSchedule {
            alphas_cumprod,
            prediction: c.prediction_type,
        })
    }

    /// Number of timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Always false: a schedule has at least two timesteps.
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// ᾱ_t.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t.min(self.len() - 1)]
    }

    /// (sqrt(ᾱ_t), sqrt(1−ᾱ_t)): the coefficients of x₀ and ε in x_t.
    pub fn coefficients(&self, t: usize) -> (f64, f64) {
        let ab = self.alpha_bar(t);
        (ab.sqrt(), (1.0 - ab).sqrt())
    }

    /// Signal-to-noise ratio ᾱ/(1−ᾱ).
    pub fn snr(&self, t: usize) -> f64 {
        let ab = self.alpha_bar(t);
        ab / (1.0 - ab)
    }

    /// Per-sample loss weight of min-SNR-γ (Hang et al. 2023), as diffusers computes it:
    /// min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR+1) for v-prediction.
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let snr = self.snr(t);
        match self.prediction {
            PredictionType::Epsilon => snr.min(gamma) / snr,
            PredictionType::VPrediction => snr.min(gamma) / (snr + 1.0),
        }
    }

    /// Coefficients (a, b) such that target = a·ε + b·x₀.
    pub fn target_coefficients(&self, t: usize) -> (f64, f64) {
        match self.prediction {
            PredictionType::Epsilon => (1.0, 0.0),
            PredictionType::VPrediction => {
                let (sa, sb) = self.coefficients(t);
                (sa, -sb)
            }
        }
    }
}

/// Learning rate at optimiser step `step` (0-based), diffusers' `get_scheduler` formulas.
pub fn learning_rate(peak: f64, kind: LrScheduler, warmup: u64, total: u64, step: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    match kind {
        LrScheduler::Constant => peak,
        LrScheduler::Cosine => {
            let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_schedule_matches_diffusers_values() {
        let s = NoiseSchedule::new(&SchedulerConfig::default()).unwrap();
        assert_eq!(s.len(), 1000);
        // diffusers DDPMScheduler(scaled_linear, 0.00085, 0.012): alphas_cumprod[0] = 0.99915,
        // alphas_cumprod[999] ≈ 0.0046.
        assert!((s.alpha_bar(0) - 0.99915).abs() < 1e-9);
        assert!(
            (s.alpha_bar(999) - 0.004_660).abs() < 1e-4,
            "{}",
            s.alpha_bar(999)
        );
        let (a, b) = s.coefficients(500);
        assert!((a * a + b * b - 1.0).abs() < 1e-12);
        let lin = NoiseSchedule::new(&SchedulerConfig {
            beta_schedule: "linear".into(),
            ..SchedulerConfig::default()
        })
        .unwrap();
        assert!(lin.alpha_bar(999) < s.alpha_bar(999));
        assert!(
            NoiseSchedule::new(&SchedulerConfig {
                beta_schedule: "sigmoid".into(),
                ..SchedulerConfig::default()
            })
            .is_err()
        );
    }

    #[test]
    fn min_snr_weights_and_v_targets() {
        let mut s = NoiseSchedule::new(&SchedulerConfig::default()).unwrap();
        // Early timesteps have huge SNR and are down-weighted; late ones keep weight 1.
        assert!(s.min_snr_weight(0, 5.0) < 0.01);
        assert!((s.min_snr_weight(999, 5.0) - 1.0).abs() < 1e-12);
        assert_eq!(s.target_coefficients(10), (1.0, 0.0));
        s.prediction = PredictionType::VPrediction;
        let (a, b) = s.target_coefficients(300);
        let (sa, sb) = s.coefficients(300);
        assert_eq!((a, b), (sa, -sb));
        let snr = s.snr(999);
        assert!((s.min_snr_weight(999, 5.0) - snr / (snr + 1.0)).abs() < 1e-12);
    }

    #[test]
    fn learning_rate_warms_up_then_decays() {
        let lr = |k, s| learning_rate(1e-3, k, 10, 110, s);
        assert_eq!(lr(LrScheduler::Constant, 0), 0.0);
        assert!((lr(LrScheduler::Constant, 5) - 5e-4).abs() < 1e-15);
        assert_eq!(lr(LrScheduler::Constant, 50), 1e-3);
        assert_eq!(lr(LrScheduler::Cosine, 10), 1e-3);
        assert!((lr(LrScheduler::Cosine, 60) - 5e-4).abs() < 1e-12);
        assert!(lr(LrScheduler::Cosine, 109) < 1e-6);
    }
}
