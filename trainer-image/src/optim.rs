//! AdamW (decoupled weight decay, as in PyTorch's `torch.optim.AdamW`) over the LoRA
//! parameters, with global-norm gradient clipping and a state (step, first and second
//! moments) that a checkpoint can save and restore exactly. candle-nn's AdamW keeps its state
//! private, which would make resuming a run a different run.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::tensors::{HostTensor, TensorFileError};

/// Why an optimiser step or state restore failed.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A tensor operation failed.
    #[error("optimizer step: {0}")]
    Step(#[from] candle_core::Error),
    /// The saved state does not match the parameters.
    #[error("restoring optimizer state: {0}")]
    RestoreState(String),
    /// Converting state tensors failed.
    #[error("optimizer state: {0}")]
    ConvertState(#[from] TensorFileError),
}

/// Hyperparameters (kohya's defaults for AdamW).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
        }
    }
}

/// AdamW over named parameters.
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    hp: AdamWParams,
}

impl AdamW {
    /// An optimiser with zero moments.
    pub fn new(params: Vec<(String, Var)>, hp: AdamWParams) -> Result<AdamW, OptimError> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        let v = m.clone();
        Ok(AdamW {
            params,
            m,
            v,
            step: 0,
            hp,
        })
    }

    /// Optimiser steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The parameters, in order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Global L2 norm of the gradients present in `grads`.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64, OptimError> {
        let mut sum = 0f64;
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                sum += f64::from(
                    g.sqr()?
                        .sum_all()?
                        .to_dtype(candle_core::DType::F32)?
                        .to_scalar::<f32>()?,
                );
            }
        }
        Ok(sum.sqrt())
    }

    /// One update with learning rate `lr`; returns the gradient norm before clipping.
    /// Parameters without a gradient are left alone, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<f64, OptimError> {
        let norm = self.grad_norm(grads)?;
        let clip = match self.hp.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.hp.beta1, self.hp.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = g.affine(clip, 0.0)?;
            let m = ((self.m[i].affine(b1, 0.0))? + g.affine(1.0 - b1, 0.0)?)?;
            let v = ((self.v[i].affine(b2, 0.0))? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = v.affine(1.0 / bc2, 0.0)?.sqrt()?.affine(1.0, self.hp.eps)?;
            let update = m.affine(1.0 / bc1, 0.0)?.div(&denom)?;
            let decayed = p.as_tensor().affine(1.0 - lr * self.hp.weight_decay, 0.0)?;
            p.set(&(decayed - update.affine(lr, 0.0)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }

    /// The state as host tensors (`m.<name>`, `v.<name>`) and the step count.
    pub fn state(&self) -> Result<(BTreeMap<String, HostTensor>, u64), OptimError> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            let m_name = format!("m.{name}");
            let v_name = format!("v.{name}");
            out.insert(
                m_name.clone(),
                HostTensor::from_candle(&m_name, &self.m[i])?,
            );
            out.insert(
                v_name.clone(),
                HostTensor::from_candle(&v_name, &self.v[i])?,
            );
        }
        Ok((out, self.step))
    }

    /// Restores a state written by [`AdamW::state`].
    pub fn restore(
        &mut self,
        state: &BTreeMap<String, HostTensor>,
        step: u64,
        device: &Device,
    ) -> Result<(), OptimError> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let h = state
                    .get(&key)
                    .ok_or_else(|| OptimError::RestoreState(format!("{key} is missing")))?;
                if h.shape != p.dims() {
                    return Err(OptimError::RestoreState(format!(
                        "{key} has shape {:?}, the parameter {:?}",
                        h.shape,
                        p.dims()
                    )));
                }
                *slot = h.to_candle(&key, device)?.to_dtype(p.dtype())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quadratic_grads(p: &Var, target: &Tensor) -> GradStore {
        let loss = (p.as_tensor() - target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        loss.backward().unwrap()
    }

    #[test]
    fn first_step_matches_pytorch_adamw() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01) on loss = sum((p - 0)^2) from p = [1, -2]:
        // the first step moves each weight by lr * sign(g) plus decay: 1 -> 0.899, -2 -> -1.898.
        let dev = Device::Cpu;
        let p = Var::new(&[1f32, -2.0], &dev).unwrap();
        let target = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        let mut opt = AdamW::new(
            vec![("p".into(), p.clone())],
            AdamWParams {
                max_grad_norm: None,
                ..AdamWParams::default()
            },
        )
        .unwrap();
        let g = quadratic_grads(&p, &target);
        let norm = opt.step(&g, 0.1).unwrap();
        assert!((norm - 20f64.sqrt()).abs() < 1e-5);
        let v = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.899).abs() < 1e-5, "{v:?}");
        assert!((v[1] - (-1.898)).abs() < 1e-5, "{v:?}");
    }

    #[test]
    fn restored_state_continues_identically() {
        let dev = Device::Cpu;
        let target = Tensor::new(&[0.5f32, 0.25, -1.0], &dev).unwrap();
        let run = |split: Option<usize>| -> Vec<f32> {
            let p = Var::new(&[1f32, 2.0, 3.0], &dev).unwrap();
            let mut opt =
                AdamW::new(vec![("p".into(), p.clone())], AdamWParams::default()).unwrap();
            for i in 0..6 {
                if split == Some(i) {
                    let (state, step) = opt.state().unwrap();
                    let saved = p.as_tensor().copy().unwrap();
                    let p2 = Var::from_tensor(&saved).unwrap();
                    let mut opt2 =
                        AdamW::new(vec![("p".into(), p2.clone())], AdamWParams::default()).unwrap();
                    opt2.restore(&state, step, &dev).unwrap();
                    for _ in i..6 {
                        let g = quadratic_grads(&p2, &target);
                        opt2.step(&g, 0.05).unwrap();
                    }
                    return p2.as_tensor().to_vec1().unwrap();
                }
                let g = quadratic_grads(&p, &target);
                opt.step(&g, 0.05).unwrap();
            }
            p.as_tensor().to_vec1().unwrap()
        };
        let whole = run(None);
        assert_eq!(whole, run(Some(3)));
        assert_ne!(whole, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn clipping_limits_the_first_update_and_bad_state_is_refused() {
        let dev = Device::Cpu;
        let p = Var::new(&[100f32], &dev).unwrap();
        let target = Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], AdamWParams::default()).unwrap();
        let g = quadratic_grads(&p, &target);
        assert!(opt.step(&g, 0.01).unwrap() > 100.0);
        let mut state = opt.state().unwrap().0;
        state.remove("v.p");
        assert!(opt.restore(&state, 1, &dev).is_err());
    }
}
