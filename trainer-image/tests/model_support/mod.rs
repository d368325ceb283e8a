//! What the model tests share: deterministic inputs and the comparison of outputs.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses part of it

use candle_core::{Device, Tensor};

/// `scale · sin(a·i + b)` over the flat (row-major) index `i`, in f32 on the CPU: uneven,
/// deterministic data, and a formula a Python script can compute the same way.
pub fn wave(shape: &[usize], a: f64, b: f64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((a * i as f64 + b).sin() * scale) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The largest absolute elementwise difference of two same-shaped tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
