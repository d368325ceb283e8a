//! Gradient checkpointing: a block's activations are not kept for the backward pass but
//! recomputed there, trading one more forward of the block for the memory of its
//! intermediates (attention scores, feed-forward expansions, norms), which dominate peak
//! memory at high resolution.
//!
//! candle has no checkpointing, so it is built from a custom op:
//! - forward: the block runs on a detached copy of its input, its output is detached (the
//!   block's graph, and every intermediate it holds, is dropped at once), and a custom op
//!   node `out = Checkpointed(x)` carries that output into the graph: its forward hands the
//!   precomputed output over (one copy), its backward reruns the block on `x` with the graph on,
//!   back-propagates `grad_out` through it and returns the input's gradient;
//! - the block's LoRA parameters are not inputs of the node, so their gradients from that inner
//!   backward go to a [`Collector`] the model shares, and [`Collector::merge_into`] adds them
//!   to the outer backward's store.
//!
//! Side inputs (the text context, the time embedding) must not need gradients: they are fixed
//! inside the recomputation. `checkpoint` falls back to the plain forward when one does, or when
//! the input itself needs none (nothing to save).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, TensorId, Var};

/// Gradients of parameters inside checkpointed blocks, gathered during a backward pass.
#[derive(Debug, Default)]
pub struct Collector {
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl Collector {
    fn add(&self, id: TensorId, grad: Tensor) -> Result<()> {
        let mut grads = self.grads.lock().unwrap_or_else(PoisonError::into_inner);
        let sum = match grads.remove(&id) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        grads.insert(id, sum);
        Ok(())
    }

    /// Moves the gathered gradients into `store` (adding to any it already holds).
    pub fn merge_into(&self, store: &mut GradStore) -> Result<()> {
        let drained: Vec<_> = self
            .grads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        for (id, grad) in drained {
            let sum = match store.get_id(id) {
                Some(prev) => (prev + grad)?,
                None => grad,
            };
            store.insert_id(id, sum);
        }
        Ok(())
    }
}

/// A block's forward on its input, owning what it needs (weights and side inputs are
/// reference-counted tensors: cloning them copies nothing).
pub type BlockFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `f(x)`, with the block's activations recomputed in the backward pass instead of kept.
/// `params` are the block's trainable parameters, `side` its other inputs.
pub fn checkpoint(
    x: &Tensor,
    side: &[&Tensor],
    params: Vec<Var>,
    collector: &Arc<Collector>,
    f: BlockFn,
) -> Result<Tensor> {
    if !x.track_op() || side.iter().any(|t| t.track_op()) {
        return f(x);
    }
    let y = f(&x.detach())?.detach();
    let op = Checkpointed {
        output: Mutex::new(Some(y)),
        f,
        params,
        collector: collector.clone(),
    };
    x.apply_op1(op)
}

struct Checkpointed {
    /// The block's output, computed without a graph; taken by the node's forward.
    output: Mutex<Option<Tensor>>,
    f: BlockFn,
    params: Vec<Var>,
    collector: Arc<Collector>,
}

impl Checkpointed {
    fn take_output(&self) -> Result<Tensor> {
        self.output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpointed output taken twice".into()))
    }
}

impl CustomOp1 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take_output()?.contiguous()?;
        let shape = y.shape().clone();
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(cpu) => Ok((slice_of(cpu, layout)?, shape)),
            _ => candle_core::bail!("checkpointed block: output not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take_output()?.contiguous()?;
        let shape = y.shape().clone();
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(cuda) => Ok((cuda.try_clone(layout)?, shape)),
            _ => candle_core::bail!("checkpointed block: output not on the GPU"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = (self.f)(x.as_tensor())?;
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        for p in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                self.collector.add(p.id(), g.clone())?;
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

/// The elements `layout` (contiguous) selects from `storage`, as a new storage.
fn slice_of(storage: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("checkpointed block: output not contiguous")
    };
    Ok(match storage {
        CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
        _ => candle_core::bail!("checkpointed block: unsupported dtype"),
    })
}
