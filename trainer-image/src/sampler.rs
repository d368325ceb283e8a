//! The samplers that render preview images: which timesteps a run of N steps visits, and for
//! each step the numbers that turn the current sample and the model's output into the next
//! sample. Pure: [`plan`] is arithmetic on the noise schedule, as diffusers'
//! `EulerDiscreteScheduler` and `DDIMScheduler` (η = 0) compute it; the rendering loop applies
//! a plan to tensors.
//!
//! Both samplers are linear in the sample x and the model output o at every step, so a step is
//! four numbers: the model sees `input_scale · x` at `timestep`, and the next sample is
//! `x_coef · x + out_coef · o`. The first sample is `init_noise_sigma · noise`.

use crate::model::{PredictionType, SchedulerConfig};
use crate::schedule::NoiseSchedule;

/// A sampling method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// Euler's method on the probability-flow ODE in σ (diffusers `EulerDiscreteScheduler`).
    Euler,
    /// DDIM without added noise (diffusers `DDIMScheduler`, η = 0).
    Ddim,
}

impl Sampler {
    /// The sampler a `scheduler_config.json` names (`_class_name`); any other scheduler
    /// (PNDM, DPM-Solver, …) gets Euler, the common default.
    pub fn named(class_name: Option<&str>) -> Sampler {
        match class_name {
            Some("DDIMScheduler") => Sampler::Ddim,
            _ => Sampler::Euler,
        }
    }
}

/// How the N inference timesteps are spread over the training timesteps (diffusers'
/// `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// Multiples of `train/N` from 0, plus `steps_offset` (SD1.5's configs).
    Leading,
    /// Multiples of `train/N` counted down from the last timestep (SDXL's configs).
    Trailing,
    /// Evenly from 0 to the last timestep, rounded.
    Linspace,
}

impl Spacing {
    /// The spacing a config names; unknown or absent names get diffusers' default, `leading`.
    pub fn named(name: Option<&str>) -> Spacing {
        match name {
            Some("trailing") => Spacing::Trailing,
            Some("linspace") => Spacing::Linspace,
            _ => Spacing::Leading,
        }
    }
}

/// One sampling step (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// The timestep the model is asked about.
    pub timestep: usize,
    /// The model's input is this times the current sample.
    pub input_scale: f64,
    /// The next sample's coefficient of the current one.
    pub x_coef: f64,
    /// The next sample's coefficient of the model output.
    pub out_coef: f64,
}

/// A whole run: the first sample's scale and every step.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The first sample is this times standard normal noise.
    pub init_noise_sigma: f64,
    /// The steps, from the noisiest.
    pub steps: Vec<Step>,
}

/// What a plan is made from.
#[derive(Debug, Clone, Copy)]
pub struct PlanConfig {
    /// The sampling method.
    pub sampler: Sampler,
    /// Inference steps (at least 1).
    pub steps: usize,
    /// Timestep spacing.
    pub spacing: Spacing,
    /// Added to `leading` timesteps (`steps_offset`).
    pub steps_offset: usize,
    /// DDIM's last step goes to ᾱ = 1 (a clean sample) rather than to ᾱ₀.
    pub set_alpha_to_one: bool,
}

impl PlanConfig {
    /// A run of `steps` with the sampler and spacing the model's scheduler config names.
    pub fn for_model(c: &SchedulerConfig, steps: usize) -> PlanConfig {
        PlanConfig {
            sampler: Sampler::named(c.class_name.as_deref()),
            steps,
            spacing: Spacing::named(c.timestep_spacing.as_deref()),
            steps_offset: c.steps_offset,
            set_alpha_to_one: c.set_alpha_to_one,
        }
    }
}

/// The timesteps a run of `steps` visits, from the noisiest, over `train` training timesteps.
pub fn timesteps(train: usize, steps: usize, spacing: Spacing, offset: usize) -> Vec<usize> {
    let steps = steps.clamp(1, train);
    let last = train - 1;
    let mut ts: Vec<usize> = match spacing {
        Spacing::Leading => {
            let ratio = train / steps;
            (0..steps).map(|i| (i * ratio + offset).min(last)).collect()
        }
        Spacing::Trailing => {
            let ratio = train as f64 / steps as f64;
            (1..=steps)
                .map(|i| ((i as f64 * ratio).round() as usize).saturating_sub(1))
                .collect()
        }
        Spacing::Linspace => (0..steps)
            .map(|i| {
                if steps == 1 {
                    0
                } else {
                    (i as f64 * last as f64 / (steps - 1) as f64).round() as usize
                }
            })
            .collect(),
    };
    ts.reverse();
    ts
}

/// The plan of a run over `schedule`.
pub fn plan(schedule: &NoiseSchedule, c: &PlanConfig) -> Plan {
    let ts = timesteps(schedule.len(), c.steps, c.spacing, c.steps_offset);
    match c.sampler {
        Sampler::Euler => euler(schedule, &ts, c.spacing),
        Sampler::Ddim => ddim(schedule, &ts, c.set_alpha_to_one, c.steps),
    }
}

/// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t): the noise level of timestep t in the variance-exploding view.
fn sigma(schedule: &NoiseSchedule, t: usize) -> f64 {
    let ab = schedule.alpha_bar(t);
    ((1.0 - ab) / ab).sqrt()
}

fn euler(schedule: &NoiseSchedule, ts: &[usize], spacing: Spacing) -> Plan {
    let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma(schedule, t)).collect();
    sigmas.push(0.0);
    let max = sigmas[0];
    // diffusers' own rule (which differs by spacing for historical reasons).
    let init_noise_sigma = match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    };
    let steps = ts
        .iter()
        .enumerate()
        .map(|(i, &timestep)| {
            let (s, next) = (sigmas[i], sigmas[i + 1]);
            let norm = (s * s + 1.0).sqrt();
            // x' = x + (σ' − σ)·d, with d = (x − x̂₀)/σ the ODE's direction.
            let (x_coef, out_coef) = match schedule.prediction {
                // x̂₀ = x − σ·o, so d = o.
                PredictionType::Epsilon => (1.0, next - s),
                // x̂₀ = x/(σ²+1) − o·σ/sqrt(σ²+1), so d = x·σ/(σ²+1) + o/sqrt(σ²+1).
                PredictionType::VPrediction => {
                    (1.0 + (next - s) * s / (s * s + 1.0), (next - s) / norm)
                }
            };
            Step {
                timestep,
                input_scale: 1.0 / norm,
                x_coef,
                out_coef,
            }
        })
        .collect();
    Plan {
        init_noise_sigma,
        steps,
    }
}

fn ddim(schedule: &NoiseSchedule, ts: &[usize], set_alpha_to_one: bool, n: usize) -> Plan {
    let ratio = schedule.len() / n.clamp(1, schedule.len());
    let final_alpha = if set_alpha_to_one {
        1.0
    } else {
        schedule.alpha_bar(0)
    };
    let steps = ts
        .iter()
        .map(|&timestep| {
            let a = schedule.alpha_bar(timestep);
            let prev = match timestep.checked_sub(ratio) {
                Some(p) => schedule.alpha_bar(p),
                None => final_alpha,
            };
            let (sa, sb, pa, pb) = (a.sqrt(), (1.0 - a).sqrt(), prev.sqrt(), (1.0 - prev).sqrt());
            // x' = sqrt(ᾱ')·x̂₀ + sqrt(1 − ᾱ')·ε̂.
            let (x_coef, out_coef) = match schedule.prediction {
                // x̂₀ = (x − sqrt(1−ᾱ)·o)/sqrt(ᾱ), ε̂ = o.
                PredictionType::Epsilon => (pa / sa, pb - pa * sb / sa),
                // x̂₀ = sqrt(ᾱ)·x − sqrt(1−ᾱ)·o, ε̂ = sqrt(ᾱ)·o + sqrt(1−ᾱ)·x.
                PredictionType::VPrediction => (pa * sa + pb * sb, pb * sa - pa * sb),
            };
            Step {
                timestep,
                input_scale: 1.0,
                x_coef,
                out_coef,
            }
        })
        .collect();
    Plan {
        init_noise_sigma: 1.0,
        steps,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn schedule(prediction: PredictionType) -> NoiseSchedule {
        NoiseSchedule::new(&SchedulerConfig {
            prediction_type: prediction,
            ..SchedulerConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn timesteps_follow_diffusers_spacings() {
        assert_eq!(timesteps(1000, 4, Spacing::Leading, 1), [751, 501, 251, 1]);
        assert_eq!(timesteps(1000, 4, Spacing::Leading, 0), [750, 500, 250, 0]);
        assert_eq!(
            timesteps(1000, 4, Spacing::Trailing, 0),
            [999, 749, 499, 249]
        );
        assert_eq!(timesteps(1000, 4, Spacing::Linspace, 0), [999, 666, 333, 0]);
        assert_eq!(timesteps(1000, 1, Spacing::Trailing, 0), [999]);
        let fifty = timesteps(1000, 50, Spacing::Leading, 1);
        assert_eq!((fifty[0], fifty[49], fifty.len()), (981, 1, 50));
    }

    /// Runs `plan` on scalars with an ideal model: one that knows the clean sample `x0` and
    /// the noise, and answers what the model is trained to predict.
    fn run_ideal(p: &Plan, s: &NoiseSchedule, x0: f64, noise: f64, euler: bool) -> f64 {
        let t0 = p.steps[0].timestep;
        let (sa, sb) = s.coefficients(t0);
        // The starting sample at the first timestep, in each sampler's own scale (Euler works
        // on x = x₀ + σ·ε, which the model sees divided by sqrt(σ²+1)).
        let mut x = if euler {
            x0 + sigma(s, t0) * noise
        } else {
            sa * x0 + sb * noise
        };
        for step in &p.steps {
            let (sa, sb) = s.coefficients(step.timestep);
            let out = match s.prediction {
                PredictionType::Epsilon => noise,
                PredictionType::VPrediction => sa * noise - sb * x0,
            };
            x = step.x_coef * x + step.out_coef * out;
        }
        x
    }

    #[test]
    fn an_ideal_model_is_led_to_the_clean_sample() {
        for prediction in [PredictionType::Epsilon, PredictionType::VPrediction] {
            let s = schedule(prediction);
            // DDIM steps back by train/N whatever the spacing (as diffusers does), which
            // lands on the next timestep only with `leading`: the only spacing where an ideal
            // model's path is exact.
            for (sampler, spacing) in [
                (Sampler::Euler, Spacing::Leading),
                (Sampler::Euler, Spacing::Trailing),
                (Sampler::Euler, Spacing::Linspace),
                (Sampler::Ddim, Spacing::Leading),
            ] {
                let p = plan(
                    &s,
                    &PlanConfig {
                        sampler,
                        steps: 7,
                        spacing,
                        steps_offset: 1,
                        set_alpha_to_one: true,
                    },
                );
                let got = run_ideal(&p, &s, 0.7, -1.3, sampler == Sampler::Euler);
                assert!(
                    (got - 0.7).abs() < 1e-9,
                    "{sampler:?} {spacing:?} {prediction:?}: ended at {got}"
                );
            }
        }
    }

    #[test]
    fn ddim_without_alpha_one_stops_at_the_first_training_timestep() {
        let s = schedule(PredictionType::Epsilon);
        let c = PlanConfig {
            sampler: Sampler::Ddim,
            steps: 5,
            spacing: Spacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: false,
        };
        let got = run_ideal(&plan(&s, &c), &s, 0.7, -1.3, false);
        let (sa, sb) = s.coefficients(0);
        assert!((got - (sa * 0.7 - sb * 1.3)).abs() < 1e-9, "{got}");
    }

    #[test]
    fn euler_scales_its_input_and_first_noise_as_diffusers() {
        let s = schedule(PredictionType::Epsilon);
        let c = |spacing| PlanConfig {
            sampler: Sampler::Euler,
            steps: 4,
            spacing,
            steps_offset: 1,
            set_alpha_to_one: false,
        };
        let leading = plan(&s, &c(Spacing::Leading));
        let max = sigma(&s, 751);
        assert!((leading.init_noise_sigma - (max * max + 1.0).sqrt()).abs() < 1e-12);
        assert!((leading.steps[0].input_scale - 1.0 / (max * max + 1.0).sqrt()).abs() < 1e-12);
        let trailing = plan(&s, &c(Spacing::Trailing));
        assert!((trailing.init_noise_sigma - sigma(&s, 999)).abs() < 1e-12);
        // SD's σ_max at t = 999 is about 14.6.
        assert!((14.0..15.0).contains(&trailing.init_noise_sigma));
    }

    #[test]
    fn samplers_are_named_by_the_scheduler_config() {
        assert_eq!(Sampler::named(Some("DDIMScheduler")), Sampler::Ddim);
        assert_eq!(
            Sampler::named(Some("EulerDiscreteScheduler")),
            Sampler::Euler
        );
        assert_eq!(Sampler::named(Some("PNDMScheduler")), Sampler::Euler);
        assert_eq!(Spacing::named(Some("trailing")), Spacing::Trailing);
        assert_eq!(Spacing::named(None), Spacing::Leading);
    }
}
