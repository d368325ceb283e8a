//! The `gemm` crate called directly on f32 slices with arbitrary strides, for the CPU kernels
//! that need more than candle's `matmul` offers: a GEMM into part of a larger buffer,
//! accumulating into it, or reading an operand in place through strides (attention's heads,
//! the convolutions' shifted input planes).

use ::gemm::Parallelism;

/// dst (r × c, row stride `dst_rs`) := [dst +] beta · lhs · rhs, where lhs is r × k and rhs is
/// k × c, each given by (column stride, row stride). Single-threaded: for callers that run
/// one block per rayon task.
pub(crate) fn gemm_into(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
) {
    gemm_with(
        dims,
        dst,
        dst_rs,
        accumulate,
        lhs,
        rhs,
        beta,
        Parallelism::None,
    );
}

/// `gemm_into` spread over rayon's threads, for one large product.
pub(crate) fn gemm_into_on_all_cores(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
) {
    let parallelism = match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    };
    gemm_with(dims, dst, dst_rs, accumulate, lhs, rhs, beta, parallelism);
}

#[allow(unsafe_code, clippy::too_many_arguments)]
fn gemm_with(
    (r, c, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
    parallelism: Parallelism,
) {
    let extent = |rows: usize, cols: usize, cs: usize, rs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    // The GEMM reads and writes through raw pointers; these bounds make that sound.
    assert!(dst.len() >= extent(r, c, 1, dst_rs), "gemm: dst too short");
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
    // SAFETY: every element addressed lies inside the slices (asserted above), `dst` does not
    // alias `lhs` or `rhs` (it is a distinct `&mut`), and f32 is a type `gemm` supports.
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
