//! Scaled dot-product attention on the CPU in f32 as one kernel each way, in the manner of
//! flash attention: scores exist only for a block of query rows at a time, in a buffer that
//! stays in cache, and the backward pass recomputes them from q, k and the per-row
//! log-sum-exp the forward pass keeps (one float per query row).
//!
//! The composed chunked attention (`ops::chunked_attention`) materialised a 64 MiB score
//! chunk per op (scores, probabilities, their gradient, the broadcast subtraction and the
//! product each in a fresh buffer, so fresh pages from the kernel) and ran libm's scalar
//! `expf`. At SD1.5's 4096 tokens that was most of a full step's page faults and all of its
//! `expf` time. Here a block of `rows` queries (their scores at most `BLOCK_SCORES` floats) is
//! one task: two GEMMs forward (S = scale·Q Kᵀ, O = P V), five backward (S again,
//! dV += Pᵀ dO, dP = dO Vᵀ, dQ = scale·dS K, dK += scale·dSᵀ Q, with
//! dS = P ∘ (dP − rowsum(dO ∘ O))), on the `gemm` crate single-threaded within the task.
//!
//! Parallelism: forward over (head, query block) pairs; backward over heads, because dK and
//! dV sum over every query block of their head. SD1.5 has 8 heads per sample, enough for a
//! few cores; a many-core machine would want the backward split by key blocks too.

use gemm::Parallelism;
use rayon::prelude::*;

use super::simd;

/// Score elements (query rows × keys) of one block: 1 MiB in f32, so a block's scores and
/// their gradient fit in a core's L2 next to the operands.
const BLOCK_SCORES: usize = 1 << 18;

/// The geometry of one attention call: `heads` independent (sample, head) pairs, `n` query
/// rows, `m` keys, head width `d`, and `rows` query rows per block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub heads: usize,
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub rows: usize,
}

impl Shape {
    /// `rows`: query rows per block, `None` for the default (as many as fit `BLOCK_SCORES`,
    /// between 16 and 256).
    pub(crate) fn new(heads: usize, n: usize, m: usize, d: usize, rows: Option<usize>) -> Self {
        let rows = rows
            .unwrap_or_else(|| (BLOCK_SCORES / m.max(1)).clamp(16, 256))
            .clamp(1, n.max(1));
        Self {
            heads,
            n,
            m,
            d,
            rows,
        }
    }

    fn check(&self, q: usize, k: usize, v: usize) -> Result<(), String> {
        let (qn, kn) = (self.heads * self.n * self.d, self.heads * self.m * self.d);
        if q != qn || k != kn || v != kn {
            return Err(format!(
                "attention: q, k, v have {q}, {k}, {v} elements, expected {qn}, {kn}, {kn}"
            ));
        }
        Ok(())
    }
}

/// dst (r × c, row stride `dst_rs`) := [dst +] beta · lhs · rhs, where lhs is r × k and rhs is
/// k × c, each given by (column stride, row stride). Single-threaded: the callers run one
/// block per rayon task.
#[allow(unsafe_code)]
fn gemm_into(
    (r, c, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
) {
    let extent = |rows: usize, cols: usize, cs: usize, rs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    // The GEMM reads and writes through raw pointers; these bounds make that sound.
    assert!(
        dst.len() >= extent(r, c, 1, dst_rs),
        "attention gemm: dst too short"
    );
    assert!(
        lhs.0.len() >= extent(r, k, lhs.1, lhs.2),
        "attention gemm: lhs too short"
    );
    assert!(
        rhs.0.len() >= extent(k, c, rhs.1, rhs.2),
        "attention gemm: rhs too short"
    );
    if r == 0 || c == 0 {
        return;
    }
    // SAFETY: every element addressed lies inside the slices (asserted above), `dst` does not
    // alias `lhs` or `rhs` (it is a distinct `&mut`), and f32 is a type `gemm` supports.
    unsafe {
        gemm::gemm(
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
            Parallelism::None,
        );
    }
}

simd::multiversion! {
    /// Each row of `s` (length `m`) becomes exp(row − max(row)), unnormalised; its
    /// log-sum-exp goes to `lse` and 1 / its sum to `inv_sum` (the caller scales the block's
    /// output rows instead of the m-times larger probability rows).
    fn softmax_rows(s: &mut [f32], m: usize, lse: &mut [f32], inv_sum: &mut [f32]) {
        for ((row, l), inv) in s.chunks_mut(m).zip(lse.iter_mut()).zip(inv_sum.iter_mut()) {
            let max = simd::max(row);
            let sum = simd::exp_shifted_sum(row, max);
            *l = max + sum.ln();
            *inv = 1.0 / sum;
        }
    }
}

simd::multiversion! {
    /// Scores to probabilities with each row's log-sum-exp from the forward pass.
    fn probabilities(s: &mut [f32], m: usize, lse: &[f32]) {
        for (row, &l) in s.chunks_mut(m).zip(lse) {
            for v in row.iter_mut() {
                *v = simd::exp(*v - l);
            }
        }
    }
}

simd::multiversion! {
    /// dS = P ∘ (dP − D) in place of dP, D one value per row.
    fn score_gradient(dp: &mut [f32], p: &[f32], m: usize, row_term: &[f32]) {
        for ((g, pr), &d) in dp.chunks_mut(m).zip(p.chunks(m)).zip(row_term) {
            for (gv, &pv) in g.iter_mut().zip(pr) {
                *gv = pv * (*gv - d);
            }
        }
    }
}

/// Attention output (heads, n, d) and per-row log-sum-exp (heads, n) of `softmax(scale · q
/// kᵀ) v` for contiguous q (heads, n, d), k and v (heads, m, d).
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: Shape,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    shape.check(q.len(), k.len(), v.len())?;
    let Shape { n, m, d, rows, .. } = shape;
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; shape.heads * n];
    if n == 0 || d == 0 {
        return Ok((out, lse));
    }
    if m == 0 {
        return Err("attention over zero keys".into());
    }
    out.par_chunks_mut(n * d)
        .zip(lse.par_chunks_mut(n))
        .enumerate()
        .for_each(|(h, (out_h, lse_h))| {
            let (q_h, k_h, v_h) = (
                &q[h * n * d..][..n * d],
                &k[h * m * d..][..m * d],
                &v[h * m * d..][..m * d],
            );
            out_h
                .par_chunks_mut(rows * d)
                .zip(lse_h.par_chunks_mut(rows))
                .enumerate()
                .for_each_init(
                    || (Vec::new(), Vec::new()),
                    |(s, inv): &mut (Vec<f32>, Vec<f32>), (b, (o, l))| {
                        let r = l.len();
                        let q_b = &q_h[b * rows * d..][..r * d];
                        s.resize(r * m, 0.0);
                        inv.resize(r, 0.0);
                        // S = scale · Q_b Kᵀ: Kᵀ is k read with column stride d, row stride 1.
                        gemm_into((r, m, d), s, m, false, (q_b, 1, d), (k_h, d, 1), scale);
                        softmax_rows(s, m, l, inv);
                        gemm_into((r, d, m), o, d, false, (s, 1, m), (v_h, 1, d), 1.0);
                        for (row, &f) in o.chunks_mut(d).zip(inv.iter()) {
                            row.iter_mut().for_each(|x| *x *= f);
                        }
                    },
                );
        });
    Ok((out, lse))
}

/// The gradients of q, k and v, laid out as the inputs.
#[derive(Debug)]
pub(crate) struct Gradients {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// Gradients of q, k and v of `forward`, given its output, its log-sum-exp and the output
/// gradient `dout` (heads, n, d).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    shape: Shape,
    scale: f32,
) -> Result<Gradients, String> {
    shape.check(q.len(), k.len(), v.len())?;
    let Shape { n, m, d, rows, .. } = shape;
    if out.len() != q.len() || dout.len() != q.len() || lse.len() != shape.heads * n {
        return Err(format!(
            "attention backward: output {}, gradient {}, log-sum-exp {} elements for q of {}",
            out.len(),
            dout.len(),
            lse.len(),
            q.len()
        ));
    }
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    if n == 0 || m == 0 || d == 0 {
        return Ok(Gradients { dq, dk, dv });
    }
    dq.par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(m * d).zip(dv.par_chunks_mut(m * d)))
        .enumerate()
        .for_each(|(h, (dq_h, (dk_h, dv_h)))| {
            let span = |len: usize| h * len..(h + 1) * len;
            let (q_h, k_h, v_h) = (&q[span(n * d)], &k[span(m * d)], &v[span(m * d)]);
            let (o_h, do_h, lse_h) = (&out[span(n * d)], &dout[span(n * d)], &lse[span(n)]);
            // D = rowsum(dO ∘ O), the softmax backward's per-row term.
            let row_term: Vec<f32> = do_h
                .chunks(d)
                .zip(o_h.chunks(d))
                .map(|(g, o)| g.iter().zip(o).map(|(a, b)| a * b).sum())
                .collect();
            let (mut p, mut ds) = (vec![0f32; rows * m], vec![0f32; rows * m]);
            for (b, dq_b) in dq_h.chunks_mut(rows * d).enumerate() {
                let r = dq_b.len() / d;
                let (q_b, do_b) = (
                    &q_h[b * rows * d..][..r * d],
                    &do_h[b * rows * d..][..r * d],
                );
                let (p, ds) = (&mut p[..r * m], &mut ds[..r * m]);
                gemm_into((r, m, d), p, m, false, (q_b, 1, d), (k_h, d, 1), scale);
                probabilities(p, m, &lse_h[b * rows..][..r]);
                // dV += Pᵀ dO_b: Pᵀ is p read with column stride m, row stride 1.
                gemm_into((m, d, r), dv_h, d, true, (p, m, 1), (do_b, 1, d), 1.0);
                gemm_into((r, m, d), ds, m, false, (do_b, 1, d), (v_h, d, 1), 1.0);
                score_gradient(ds, p, m, &row_term[b * rows..][..r]);
                gemm_into((r, d, m), dq_b, d, false, (ds, 1, m), (k_h, 1, d), scale);
                gemm_into((m, d, r), dk_h, d, true, (ds, m, 1), (q_b, 1, d), scale);
            }
        });
    Ok(Gradients { dq, dk, dv })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention and its gradients in f64 straight from the definitions, one head at a time.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        s: Shape,
        scale: f64,
    ) -> [Vec<f64>; 4] {
        let Shape { heads, n, m, d, .. } = s;
        let (mut o, mut dq, mut dk, mut dv) = (
            vec![0f64; heads * n * d],
            vec![0f64; heads * n * d],
            vec![0f64; heads * m * d],
            vec![0f64; heads * m * d],
        );
        for h in 0..heads {
            let qi = |i: usize, t: usize| f64::from(q[(h * n + i) * d + t]);
            let kj = |j: usize, t: usize| f64::from(k[(h * m + j) * d + t]);
            let vj = |j: usize, t: usize| f64::from(v[(h * m + j) * d + t]);
            let gi = |i: usize, t: usize| f64::from(dout[(h * n + i) * d + t]);
            for i in 0..n {
                let scores: Vec<f64> = (0..m)
                    .map(|j| scale * (0..d).map(|t| qi(i, t) * kj(j, t)).sum::<f64>())
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                for t in 0..d {
                    o[(h * n + i) * d + t] = (0..m).map(|j| p[j] * vj(j, t)).sum();
                }
                let dp: Vec<f64> = (0..m)
                    .map(|j| (0..d).map(|t| gi(i, t) * vj(j, t)).sum())
                    .collect();
                let dot: f64 = (0..m).map(|j| p[j] * dp[j]).sum();
                for j in 0..m {
                    let ds = p[j] * (dp[j] - dot);
                    for t in 0..d {
                        dq[(h * n + i) * d + t] += scale * ds * kj(j, t);
                        dk[(h * m + j) * d + t] += scale * ds * qi(i, t);
                        dv[(h * m + j) * d + t] += p[j] * gi(i, t);
                    }
                }
            }
        }
        [o, dq, dk, dv]
    }

    fn wave(len: usize, phase: f32, amp: f32) -> Vec<f32> {
        (0..len)
            .map(|i| amp * (i as f32 * 0.377 + phase).sin())
            .collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - y).abs())
            .fold(0.0, f64::max)
    }

    /// Self- and cross-attention, blocks that do and do not divide the rows, one row per
    /// block, and the default blocking: output and all three gradients match the f64
    /// definition.
    #[test]
    fn matches_the_definition_and_its_gradients() {
        for (heads, n, m, d, rows) in [
            (3usize, 37usize, 37usize, 8usize, Some(8usize)),
            (2, 29, 11, 5, Some(7)),
            (1, 5, 77, 16, Some(1)),
            (4, 64, 64, 40, None),
        ] {
            let s = Shape::new(heads, n, m, d, rows);
            let q = wave(heads * n * d, 0.1, 1.0);
            let k = wave(heads * m * d, 1.3, 2.0);
            let v = wave(heads * m * d, 2.9, 1.0);
            let g = wave(heads * n * d, 4.2, 1.0);
            let scale = 1.0 / (d as f32).sqrt();
            let (o, lse) = forward(&q, &k, &v, s, scale).unwrap();
            let Gradients { dq, dk, dv } = backward(&q, &k, &v, &o, &lse, &g, s, scale).unwrap();
            let [ro, rdq, rdk, rdv] = reference(&q, &k, &v, &g, s, f64::from(scale));
            let case = format!("{heads}x{n}x{m}x{d} rows {rows:?}");
            assert!(max_abs_diff(&o, &ro) < 2e-6, "output {case}");
            for (name, ours, theirs) in [("q", &dq, &rdq), ("k", &dk, &rdk), ("v", &dv, &rdv)] {
                let norm = theirs.iter().map(|x| x.abs()).fold(0.0, f64::max);
                assert!(norm > 1e-3, "gradient {name} is degenerate ({case})");
                assert!(
                    max_abs_diff(ours, theirs) < 1e-5 * norm.max(1.0),
                    "gradient {name} {case}"
                );
            }
        }
    }

    #[test]
    fn rejects_mismatched_operands() {
        let s = Shape::new(1, 4, 4, 2, None);
        let err = forward(&[0.0; 8], &[0.0; 8], &[0.0; 6], s, 1.0).unwrap_err();
        assert!(err.contains("expected 8, 8, 8"), "{err}");
    }
}
