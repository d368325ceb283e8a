//! What one training sample draws from the noise process, for either kind of model: the value
//! the model is told (a DDPM timestep, or flow matching's σ), the noisy input and the target as
//! mixes of the clean latent x₀ and the noise ε, and the sample's loss weight. Pure: the
//! training step turns a [`Draw`] into tensors.

use crate::flow::{self, FlowMatching};
use crate::rng::Rng;
use crate::schedule::NoiseSchedule;

/// The noise process a model was trained with.
#[derive(Clone, Debug)]
pub enum Objective {
    /// DDPM (SD1.5, SDXL): integer timesteps, ε or v targets, optional min-SNR-γ weights.
    Ddpm {
        schedule: NoiseSchedule,
        min_snr_gamma: Option<f64>,
    },
    /// Rectified flow (FLUX.1): σ in (0, 1], velocity targets, equal weights.
    Flow(FlowMatching),
}

/// One sample's draw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// What the model is conditioned on: the timestep index (DDPM) or σ (flow).
    pub model_time: f32,
    /// (a, b): noisy input = a·x₀ + b·ε.
    pub input: (f64, f64),
    /// (a, b): target = a·ε + b·x₀.
    pub target: (f64, f64),
    /// The sample's loss weight.
    pub weight: f64,
}

impl Objective {
    /// Draws a noise level for an image of `tokens` latent tokens (flow matching's shift
    /// depends on it; DDPM ignores it). Consumes exactly one draw's worth of `rng`, before the
    /// noise itself is drawn, so runs and resumes replay the same sequence.
    pub fn draw(&self, rng: &mut Rng, tokens: usize) -> Draw {
        match self {
            Objective::Ddpm {
                schedule,
                min_snr_gamma,
            } => {
                let t = rng.below(schedule.len() as u64) as usize;
                Draw {
                    model_time: t as f32,
                    input: schedule.coefficients(t),
                    target: schedule.target_coefficients(t),
                    weight: min_snr_gamma.map_or(1.0, |g| schedule.min_snr_weight(t, g)),
                }
            }
            Objective::Flow(f) => {
                let sigma = f.sample_sigma(rng, tokens);
                Draw {
                    model_time: sigma as f32,
                    input: flow::input_coefficients(sigma),
                    target: flow::TARGET,
                    weight: 1.0,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use loraplane_crds::v1alpha1::TimestepSampling;

    use super::*;
    use crate::model::SchedulerConfig;

    #[test]
    fn ddpm_draws_are_the_schedules_and_flow_draws_are_rectified() {
        let schedule =
            NoiseSchedule::new(&SchedulerConfig::default()).unwrap_or_else(|e| panic!("{e}"));
        let ddpm = Objective::Ddpm {
            schedule: schedule.clone(),
            min_snr_gamma: Some(5.0),
        };
        let mut rng = Rng::new(3, 0);
        let d = ddpm.draw(&mut rng, 64);
        let t = d.model_time as usize;
        assert_eq!(d.model_time, t as f32);
        assert_eq!(d.input, schedule.coefficients(t));
        assert_eq!(d.weight, schedule.min_snr_weight(t, 5.0));

        let f = FlowMatching::new(&SchedulerConfig::default(), TimestepSampling::Uniform)
            .unwrap_or_else(|e| panic!("{e}"));
        let d = Objective::Flow(f).draw(&mut rng, 64);
        let sigma = f64::from(d.model_time);
        assert!(sigma > 0.0 && sigma <= 1.0);
        assert!((d.input.0 + d.input.1 - 1.0).abs() < 1e-12 && (d.input.1 - sigma).abs() < 1e-6);
        assert_eq!((d.target, d.weight), ((1.0, -1.0), 1.0));
    }
}
