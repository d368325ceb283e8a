//! Tensor storage as the trainer's own ops see it, shared by every custom op and CPU kernel:
//! - which tensors the hand-written CPU kernels take ([`fusable`]: f32 on the CPU) and
//!   their elements as slices ([`contiguous_f32`], [`read_f32`]);
//! - an output computed before its op joins the graph, handed over as the op's forward
//!   result on whatever device it lives ([`Precomputed`]).
//!
//! It sits below `ops`, `conv`, `fused`, `attention` and `checkpoint`, which all use it, so none of
//! them needs another's internals.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, DType, Layout, MetalStorage, Result, Shape, Storage, Tensor,
};

/// An op's output computed before the op joins the graph, handed over (once) as the op's
/// forward result, so one implementation serves every device and the graph does not hold it
/// a second time.
pub(crate) struct Precomputed {
    value: std::sync::Mutex<Option<Tensor>>,
    what: &'static str,
}

impl Precomputed {
    pub(crate) fn new(value: Tensor, what: &'static str) -> Self {
        Self {
            value: std::sync::Mutex::new(Some(value)),
            what,
        }
    }

    /// The output's storage, on the device `on_device` picks; it must be a fresh contiguous
    /// tensor, since the storage is handed over whole.
    pub(crate) fn hand_over<S: BackendStorage>(
        &self,
        on_device: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let what = self.what;
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{what}: lock poisoned")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: already taken")))?;
        let (storage, layout) = value.storage_and_layout();
        let Some(s) = on_device(&storage) else {
            candle_core::bail!("{what} is on another device");
        };
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("{what} is not contiguous");
        }
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }
}

pub(crate) fn on_cpu(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn on_cuda(s: &Storage) -> Option<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn on_metal(s: &Storage) -> Option<&MetalStorage> {
    match s {
        Storage::Metal(s) => Some(s),
        _ => None,
    }
}

/// The elements of contiguous f32 CPU storage with layout `l`; `what` names the operand in
/// the error (e.g. "conv2d GEMM result"). Shared by every CPU kernel.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what} must be f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what} must be contiguous, got strides {:?}", l.stride()),
    }
}

/// Read access to the elements of a contiguous f32 CPU tensor, without a copy.
pub(crate) struct ReadF32<G> {
    /// The tensor's storage lock guard, held while the slice is in use.
    storage: G,
    range: std::ops::Range<usize>,
}

impl<G: std::ops::Deref<Target = Storage>> ReadF32<G> {
    pub(crate) fn slice(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.clone()],
            // `read_f32` only builds a `ReadF32` over f32 CPU storage.
            _ => &[],
        }
    }
}

/// `t`'s elements as a slice (see `ReadF32`), refused unless `t` is a contiguous f32 CPU
/// tensor; `what` names it in the error.
pub(crate) fn read_f32<'a>(
    t: &'a Tensor,
    what: &str,
) -> Result<ReadF32<impl std::ops::Deref<Target = Storage> + 'a>> {
    let (storage, layout) = t.storage_and_layout();
    let Some(cpu) = on_cpu(&storage) else {
        candle_core::bail!("{what} must be on the CPU");
    };
    let start = layout.start_offset();
    let range = start..start + contiguous_f32(cpu, layout, what)?.len();
    Ok(ReadF32 { storage, range })
}

/// Whether the fused kernels apply to this tensor (f32 on the CPU).
pub(crate) fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The forward passes (every device) of a one-operand graph node whose output was computed
/// beforehand: they hand over the [`Precomputed`] field named.
macro_rules! hand_over_forward {
    ($field:ident) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.$field
                .hand_over($crate::model::kernels::storage::on_cpu)
        }

        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.$field
                .hand_over($crate::model::kernels::storage::on_cuda)
        }

        fn metal_fwd(
            &self,
            _: &candle_core::MetalStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
            self.$field
                .hand_over($crate::model::kernels::storage::on_metal)
        }
    };
}
pub(crate) use hand_over_forward;
