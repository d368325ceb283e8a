//! The `gemm` crate called directly on f32 slices with arbitrary strides, for the CPU kernels
//! that need more than candle's `matmul` offers: a GEMM into part of a larger buffer,
//! accumulating into it, or reading an operand in place through strides (attention's Kᵀ and
//! Pᵀ, the convolutions' shifted input planes, a linear's transposed weight).

use ::gemm::Parallelism;

/// The threads one GEMM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cores {
    /// The calling thread only: for callers that run one block per rayon task.
    One,
    /// Spread over rayon's threads: for one large product.
    All,
}

/// dst (r × c, row stride `dst_rs`) := [dst +] beta · lhs · rhs, where lhs is r × k and rhs is
/// k × c, each given by (column stride, row stride).
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    (r, c, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
    cores: Cores,
) {
    let parallelism = match (cores, rayon::current_num_threads()) {
        (Cores::One, _) | (Cores::All, 0 | 1) => Parallelism::None,
        (Cores::All, n) => Parallelism::Rayon(n),
    };
    // One past the last element a (rows × cols) operand addresses; saturating, so that an
    // overflow fails the bounds checks below instead of wrapping past them.
    let extent = |rows: usize, cols: usize, cs: usize, rs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1)
                .saturating_mul(rs)
                .saturating_add((cols - 1).saturating_mul(cs))
                .saturating_add(1)
        }
    };
    // The GEMM reads and writes through raw pointers; these bounds make that sound, and rows
    // of `dst` that do not overlap keep the parallel GEMM's threads off each other's elements.
    assert!(dst.len() >= extent(r, c, 1, dst_rs), "gemm: dst too short");
    assert!(r <= 1 || dst_rs >= c, "gemm: dst rows overlap");
    assert!(
        lhs.0.len() >= extent(r, k, lhs.1, lhs.2),
        "gemm: lhs too short"
    );
    assert!(
        rhs.0.len() >= extent(k, c, rhs.1, rhs.2),
        "gemm: rhs too short"
    );
    if r == 0 || c == 0 {
        return;
    }
    // SAFETY: every element addressed lies inside the slices (asserted above), no two
    // elements of `dst` share an address (its rows do not overlap, asserted above), `dst`
    // does not alias `lhs` or `rhs` (it is a distinct `&mut`), and f32 is a type `gemm`
    // supports.
    unsafe {
        ::gemm::gemm(
            r,
            c,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0.as_ptr(),
            rhs.1 as isize,
            rhs.2 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}
