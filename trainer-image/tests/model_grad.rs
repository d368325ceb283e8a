//! Gradients flow through the whole UNet to every LoRA adapter (no fused op cuts the graph)
//! and agree with central finite differences.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor, Var};
use loraplane_trainer::model::{self, DiffusionModel, LoraSpec, ModelFamily, tiny};

fn load(family: ModelFamily, dtype: DType) -> (tempfile::TempDir, DiffusionModel) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_model(dir.path(), family, 11).unwrap();
    let lora = LoraSpec {
        rank: 2,
        alpha: 1.0,
    };
    let m = model::load_with_dtype(dir.path(), family, lora, &Device::Cpu, dtype).unwrap();
    (dir, m)
}

fn wave(shape: &[usize], phase: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| (i as f64 * 0.731 + phase).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Mean squared error of the prediction against a fixed target, as the trainer's loss.
fn loss(m: &DiffusionModel, dtype: DType) -> Tensor {
    let dev = Device::Cpu;
    let b = 2;
    let captions = vec!["a photo of sks dog".to_string(), "red car".to_string()];
    let cond = m.encode_prompts(&captions).unwrap();
    let noisy = wave(&[b, 4, 8, 8], 0.3, dtype);
    let target = wave(&[b, 4, 8, 8], 1.7, dtype);
    let t = Tensor::new(&[37f32, 611.0], &dev).unwrap();
    let ids = Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]; 2], &dev).unwrap();
    let time_ids = (m.family() == ModelFamily::Sdxl).then_some(&ids);
    let pred = m.predict(&noisy, &t, &cond, time_ids).unwrap();
    (pred - target).unwrap().sqr().unwrap().mean_all().unwrap()
}

fn every_up_gets_a_gradient(family: ModelFamily) {
    let (_dir, m) = load(family, DType::F32);
    let l = loss(&m, DType::F32);
    let grads = l.backward().unwrap();
    let adapters = m.adapters();
    assert!(!adapters.is_empty());
    for (name, a) in &adapters {
        let g = grads
            .get(a.up.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for up"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: up gradient {norm}");
        // A gradient that records ops holds the step's whole graph, and so would the
        // optimizer state made from it, step after step.
        for (which, v) in [("up", &a.up), ("down", &a.down)] {
            let g = grads.get(v.as_tensor()).unwrap();
            assert!(
                !g.track_op(),
                "{name}: the {which} gradient keeps the graph alive"
            );
        }
        // One plain SGD step moves `up` off zero.
        a.up.set(&(a.up.as_tensor() - (g * 0.1).unwrap()).unwrap())
            .unwrap();
        let moved = a.up.as_tensor().abs().unwrap().sum_all().unwrap();
        assert!(
            moved.to_scalar::<f32>().unwrap() > 0.0,
            "{name} did not move"
        );
    }
    // Frozen base weights are not variables: only adapter tensors are trainable.
    assert_eq!(m.trainable_vars().len(), adapters.len() * 2);
}

#[test]
fn sd15_backward_reaches_every_adapter() {
    every_up_gets_a_gradient(ModelFamily::Sd15);
}

#[test]
fn sdxl_backward_reaches_every_adapter() {
    every_up_gets_a_gradient(ModelFamily::Sdxl);
}

fn entry(v: &Var, i: usize) -> f64 {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[i]
}

fn set_entry(v: &Var, i: usize, value: f64) {
    let mut data = v
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    data[i] = value;
    v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap())
        .unwrap();
}

fn finite_difference_check(family: ModelFamily) {
    let (_dir, m) = load(family, DType::F64);
    // Non-zero `up` matrices so `down` entries have gradients too.
    let mut ts = m.adapter_tensors();
    for (k, t) in ts.iter_mut() {
        if k.ends_with(".up") {
            let phase = k.len() as f64;
            *t = (wave(t.dims(), phase, DType::F64) * 0.05).unwrap();
        }
    }
    m.load_adapters(&ts).unwrap();

    let grads = loss(&m, DType::F64).backward().unwrap();
    let adapters = m.adapters();
    let picks = [
        0,
        adapters.len() / 3,
        adapters.len() / 2,
        adapters.len() - 1,
    ];
    let h = 1e-5;
    for &p in &picks {
        let (name, a) = &adapters[p];
        for (which, var) in [("down", &a.down), ("up", &a.up)] {
            let i = var.elem_count() / 2;
            let analytic = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[i];
            let x0 = entry(var, i);
            set_entry(var, i, x0 + h);
            let plus = loss(&m, DType::F64).to_scalar::<f64>().unwrap();
            set_entry(var, i, x0 - h);
            let minus = loss(&m, DType::F64).to_scalar::<f64>().unwrap();
            set_entry(var, i, x0);
            let numeric = (plus - minus) / (2.0 * h);
            let tol = 1e-6 + 1e-4 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() < tol,
                "{name}.{which}[{i}]: analytic {analytic:e} vs numeric {numeric:e}"
            );
            assert!(analytic.abs() > 1e-9, "{name}.{which}[{i}] has no gradient");
        }
    }
}

#[test]
fn sd15_gradients_match_finite_differences() {
    finite_difference_check(ModelFamily::Sd15);
}

#[test]
fn sdxl_gradients_match_finite_differences() {
    finite_difference_check(ModelFamily::Sdxl);
}

/// The f32 CPU path (fused norms, activations, GEGLU and attention, GEMM convolutions) gives
/// every adapter the gradient of the f64 path, which runs candle's composed ops and is the one
/// checked against finite differences above.
fn cpu_kernels_match_the_f64_path(family: ModelFamily) {
    let run = |dtype: DType| {
        let (dir, m) = load(family, dtype);
        let mut ts = m.adapter_tensors();
        for (k, t) in ts.iter_mut() {
            if k.ends_with(".up") {
                *t = (wave(t.dims(), k.len() as f64, dtype) * 0.05).unwrap();
            }
        }
        m.load_adapters(&ts).unwrap();
        let l = loss(&m, dtype);
        let grads = l.backward().unwrap();
        let per_adapter: Vec<(String, Vec<f64>)> = m
            .adapters()
            .iter()
            .flat_map(|(name, a)| {
                [
                    (format!("{name}.down"), &a.down),
                    (format!("{name}.up"), &a.up),
                ]
            })
            .map(|(name, v)| {
                let g = grads.get(v.as_tensor()).unwrap();
                let g = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                (name, g.to_vec1::<f64>().unwrap())
            })
            .collect();
        drop(dir);
        (
            l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
            per_adapter,
        )
    };
    let (loss32, g32) = run(DType::F32);
    let (loss64, g64) = run(DType::F64);
    assert!(
        (loss32 - loss64).abs() < 1e-5 * loss64.abs(),
        "loss {loss32} vs {loss64}"
    );
    assert_eq!(g32.len(), g64.len());
    for ((name, a), (_, b)) in g32.iter().zip(&g64) {
        let norm = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt();
        assert!(norm > 0.0, "{name}: no gradient");
        assert!(
            diff < 1e-4 * norm,
            "{name}: f32 gradient off by {:e} relative",
            diff / norm
        );
    }
}

#[test]
fn sd15_cpu_kernels_match_the_f64_path() {
    cpu_kernels_match_the_f64_path(ModelFamily::Sd15);
}

#[test]
fn sdxl_cpu_kernels_match_the_f64_path() {
    cpu_kernels_match_the_f64_path(ModelFamily::Sdxl);
}

#[test]
fn half_precision_model_trains_f32_adapters() {
    let (_dir, m) = load(ModelFamily::Sd15, DType::F16);
    let l = loss(&m, DType::F16);
    let grads = l.backward().unwrap();
    for (name, a) in m.adapters() {
        assert_eq!(a.up.dtype(), DType::F32, "{name}");
        let g = grads.get(a.up.as_tensor()).unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
    }
}
