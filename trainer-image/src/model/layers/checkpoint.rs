//! Gradient checkpointing: a block's activations are not kept for the backward pass but
//! recomputed there, trading one more forward of the block for the memory of its
//! intermediates (attention scores, feed-forward expansions, norms), which dominate peak
//! memory at high resolution.
//!
//! candle has no checkpointing, so it is built from a custom op:
//! - forward: the block runs on a detached copy of its input, its output is detached (the
//!   block's graph, and every intermediate it holds, is dropped at once), and a custom op
//!   node `out = Checkpointed(x)` carries that output into the graph: its forward hands the
//!   precomputed output over (`storage::Precomputed`, on any device), its backward reruns
//!   the block on `x` with the graph on, back-propagates `grad_out` through it and returns
//!   the input's gradient;
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
use candle_core::{CustomOp1, Result, Tensor, TensorId, Var};

use crate::model::kernels::storage::{Precomputed, hand_over_forward};

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

/// A model's gradient-checkpointing switch: off, or on with the collector its checkpointed
/// blocks' adapter gradients go to. Every family holds one.
#[derive(Debug, Clone, Default)]
pub struct Checkpointing(Option<Arc<Collector>>);

impl Checkpointing {
    pub fn new(on: bool) -> Self {
        Self(on.then(|| Arc::new(Collector::default())))
    }

    /// `f(x)`: through [`checkpoint`] when on (`params` are the block's trainable variables,
    /// `side` its other inputs), directly when off.
    pub fn run(
        &self,
        x: &Tensor,
        side: &[&Tensor],
        params: impl FnOnce() -> Vec<Var>,
        f: BlockFn,
    ) -> Result<Tensor> {
        match &self.0 {
            None => f(x),
            Some(collector) => checkpoint(x, side, params(), collector, f),
        }
    }

    /// Adds the adapter gradients gathered inside checkpointed blocks to `store` (a no-op
    /// when off). Call after every `backward`.
    pub fn merge_into(&self, store: &mut GradStore) -> Result<()> {
        match &self.0 {
            Some(collector) => collector.merge_into(store),
            None => Ok(()),
        }
    }
}

/// A block's forward on its input, owning what it needs (weights and side inputs are
/// reference-counted tensors: cloning them copies nothing).
pub type BlockFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `f(x)`, with the block's activations recomputed in the backward pass instead of kept.
/// `params` are the block's trainable parameters, `side` its other inputs.
fn checkpoint(
    x: &Tensor,
    side: &[&Tensor],
    params: Vec<Var>,
    collector: &Arc<Collector>,
    f: BlockFn,
) -> Result<Tensor> {
    if !x.track_op() || side.iter().any(|t| t.track_op()) {
        return f(x);
    }
    // A fresh contiguous tensor, as the hand-over needs (a no-op when it already is one).
    let y = f(&x.detach())?.detach().contiguous()?;
    let op = Checkpointed {
        output: Precomputed::new(y, "checkpointed block output"),
        f,
        params,
        collector: collector.clone(),
    };
    x.apply_op1(op)
}

struct Checkpointed {
    /// The block's output, computed without a graph; handed over by the node's forward.
    output: Precomputed,
    f: BlockFn,
    params: Vec<Var>,
    collector: Arc<Collector>,
}

impl CustomOp1 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    hand_over_forward!(output);

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
