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
//! Parallelism: forward over (sample, head) pairs and within each over its query blocks;
//! backward over (sample, head) pairs only, because dK and dV sum over every query block of
//! their head. SD1.5 has 8 heads per sample, enough for a few cores; a many-core machine would
//! want the backward split by key blocks too.

use rayon::prelude::*;

use super::gemm::{Cores, gemm_into};
use super::simd;

/// Score elements (query rows × keys) of one block: 2 MiB in f32, 128 query rows at SD1.5's
/// 4096 tokens. A block's scores and their gradient (4 MiB) about fill a core's L2 here; half
/// the rows (1 MiB, the first choice) kept them in L2 with room to spare, but the GEMMs whose
/// inner or outer size is the block's rows (O = P V, dV, dQ, dK) ran at 70–77 GFLOP/s against
/// 110–115 at 256 rows (a standalone `gemm` harness, 4096 keys, head width 40). Self-attention
/// at 64x64 with its gradients (`trainer-bench --attention-micro`, minimum of 8 runs):
/// 1.29 CPU-s at 64 rows, 1.13 at 128, 1.31 at 256.
const BLOCK_SCORES: usize = 1 << 19;

/// The geometry of one attention call on token-major tensors, the layout the projections
/// produce: q is (batch, n, heads·d), k and v are (batch, m, heads·d), and head h of a token
/// is its columns h·d..(h+1)·d. `rows` query rows per block.
///
/// The kernels split the heads into (batch·heads, len, d) copies and merge the results back
/// themselves: as candle ops around the kernel, the split and the merge were four graph nodes
/// per operand (reshape, transpose, copy, reshape), each of which candle's backward pass pays
/// for with a zero tensor and a sum at the operand's full size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub rows: usize,
}

impl Shape {
    /// `rows`: query rows per block, `None` for the default (as many as fit `BLOCK_SCORES`,
    /// between 16 and 256).
    pub(crate) fn new(
        batch: usize,
        heads: usize,
        (n, m, d): (usize, usize, usize),
        rows: Option<usize>,
    ) -> Self {
        let rows = rows
            .unwrap_or_else(|| (BLOCK_SCORES / m.max(1)).clamp(16, 256))
            .clamp(1, n.max(1));
        Self {
            batch,
            heads,
            n,
            m,
            d,
            rows,
        }
    }

    /// Elements per token: heads · d.
    fn width(&self) -> usize {
        self.heads * self.d
    }

    /// (sample, head) pairs.
    fn pairs(&self) -> usize {
        self.batch * self.heads
    }

    /// A token-major (batch, len, heads·d) operand as head-major (batch·heads, len, d), which
    /// the kernels read contiguously: their GEMMs are ~6 % slower reading the heads in place
    /// with a row stride of heads·d.
    fn split(&self, x: &[f32], len: usize) -> Vec<f32> {
        let (d, c) = (self.d, self.width());
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(len * d)
            .enumerate()
            .for_each(|(pair, dst)| {
                let (b, h) = (pair / self.heads, pair % self.heads);
                let src = &x[b * len * c + h * d..];
                for (i, row) in dst.chunks_mut(d).enumerate() {
                    row.copy_from_slice(&src[i * c..][..d]);
                }
            });
        out
    }

    /// The inverse of `split`.
    fn merge(&self, x: &[f32], len: usize) -> Vec<f32> {
        let (d, c) = (self.d, self.width());
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c)
            .with_min_len(64)
            .enumerate()
            .for_each(|(token, dst)| {
                let (b, i) = (token / len, token % len);
                for (h, dst) in dst.chunks_mut(d).enumerate() {
                    dst.copy_from_slice(&x[((b * self.heads + h) * len + i) * d..][..d]);
                }
            });
        out
    }

    fn check(&self, q: usize, k: usize, v: usize) -> Result<(), String> {
        let (qn, kn) = (
            self.batch * self.n * self.width(),
            self.batch * self.m * self.width(),
        );
        if q != qn || k != kn || v != kn {
            return Err(format!(
                "attention: q, k, v have {q}, {k}, {v} elements, expected {qn}, {kn}, {kn}"
            ));
        }
        Ok(())
    }
}

/// S = scale · Q_b Kᵀ for a block of r query rows of one head: Kᵀ is k read with column
/// stride d, row stride 1.
fn scores(s: &mut [f32], q_b: &[f32], k_h: &[f32], (r, m, d): (usize, usize, usize), scale: f32) {
    gemm_into(
        (r, m, d),
        s,
        m,
        false,
        (q_b, 1, d),
        (k_h, d, 1),
        scale,
        Cores::One,
    );
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

/// Attention output (batch, n, heads·d) and per-row log-sum-exp (one per sample, head and
/// query row) of `softmax(scale · q kᵀ) v`, head by head, for contiguous token-major q, k
/// and v (`Shape`).
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: Shape,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    shape.check(q.len(), k.len(), v.len())?;
    let Shape { n, m, d, .. } = shape;
    if n == 0 || d == 0 || shape.heads == 0 {
        return Ok((vec![0f32; q.len()], vec![0f32; shape.pairs() * n]));
    }
    if m == 0 {
        return Err("attention over zero keys".into());
    }
    let (q, k, v) = (shape.split(q, n), shape.split(k, m), shape.split(v, m));
    let (out, lse) = forward_heads(&q, &k, &v, shape, scale);
    Ok((shape.merge(&out, n), lse))
}

/// The gradients of q, k and v, laid out as the inputs.
#[derive(Debug)]
pub(crate) struct Gradients {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// Gradients of q, k and v of `forward`, given its output, its log-sum-exp and the output
/// gradient `dout` (batch, n, heads·d).
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
    let Shape { n, m, d, .. } = shape;
    if out.len() != q.len() || dout.len() != q.len() || lse.len() != shape.pairs() * n {
        return Err(format!(
            "attention backward: output {}, gradient {}, log-sum-exp {} elements for q of {}",
            out.len(),
            dout.len(),
            lse.len(),
            q.len()
        ));
    }
    if n == 0 || m == 0 || d == 0 || shape.heads == 0 {
        return Ok(Gradients {
            dq: vec![0f32; q.len()],
            dk: vec![0f32; k.len()],
            dv: vec![0f32; v.len()],
        });
    }
    // D = rowsum(dO ∘ O) per (sample, head, query row), the softmax backward's per-row
    // term, read from the token-major operands as they are.
    let mut row_term = vec![0f32; shape.pairs() * n];
    row_term
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(pair, terms)| {
            let start = (pair / shape.heads) * n * shape.width() + (pair % shape.heads) * d;
            for (i, t) in terms.iter_mut().enumerate() {
                let at = start + i * shape.width();
                let (g, o) = (&dout[at..][..d], &out[at..][..d]);
                *t = g.iter().zip(o).map(|(a, b)| a * b).sum();
            }
        });
    let split = |x: &[f32], len: usize| shape.split(x, len);
    let Gradients { dq, dk, dv } = backward_heads(
        &split(q, n),
        &split(k, m),
        &split(v, m),
        (lse, &row_term),
        &split(dout, n),
        shape,
        scale,
    );
    Ok(Gradients {
        dq: shape.merge(&dq, n),
        dk: shape.merge(&dk, m),
        dv: shape.merge(&dv, m),
    })
}

/// `forward` on head-major operands: q (pairs, n, d), k and v (pairs, m, d), n, m, d > 0.
fn forward_heads(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: Shape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Shape { n, m, d, rows, .. } = shape;
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; shape.pairs() * n];
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
                        scores(s, q_b, k_h, (r, m, d), scale);
                        softmax_rows(s, m, l, inv);
                        gemm_into(
                            (r, d, m),
                            o,
                            d,
                            false,
                            (s, 1, m),
                            (v_h, 1, d),
                            1.0,
                            Cores::One,
                        );
                        for (row, &f) in o.chunks_mut(d).zip(inv.iter()) {
                            row.iter_mut().for_each(|x| *x *= f);
                        }
                    },
                );
        });
    (out, lse)
}

/// `backward` on head-major operands, as `forward_heads`, given the per-row log-sum-exp and
/// softmax-backward term (pairs, n) each.
fn backward_heads(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (lse, row_terms): (&[f32], &[f32]),
    dout: &[f32],
    shape: Shape,
    scale: f32,
) -> Gradients {
    let Shape { n, m, d, rows, .. } = shape;
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    dq.par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(m * d).zip(dv.par_chunks_mut(m * d)))
        .enumerate()
        .for_each(|(h, (dq_h, (dk_h, dv_h)))| {
            let span = |len: usize| h * len..(h + 1) * len;
            let (q_h, k_h, v_h) = (&q[span(n * d)], &k[span(m * d)], &v[span(m * d)]);
            let (do_h, lse_h, row_term) = (&dout[span(n * d)], &lse[span(n)], &row_terms[span(n)]);
            let (mut p, mut ds) = (vec![0f32; rows * m], vec![0f32; rows * m]);
            for (b, dq_b) in dq_h.chunks_mut(rows * d).enumerate() {
                let r = dq_b.len() / d;
                let (q_b, do_b) = (
                    &q_h[b * rows * d..][..r * d],
                    &do_h[b * rows * d..][..r * d],
                );
                let (p, ds) = (&mut p[..r * m], &mut ds[..r * m]);
                scores(p, q_b, k_h, (r, m, d), scale);
                probabilities(p, m, &lse_h[b * rows..][..r]);
                // dV += Pᵀ dO_b: Pᵀ is p read with column stride m, row stride 1.
                gemm_into(
                    (m, d, r),
                    dv_h,
                    d,
                    true,
                    (p, m, 1),
                    (do_b, 1, d),
                    1.0,
                    Cores::One,
                );
                gemm_into(
                    (r, m, d),
                    ds,
                    m,
                    false,
                    (do_b, 1, d),
                    (v_h, d, 1),
                    1.0,
                    Cores::One,
                );
                score_gradient(ds, p, m, &row_term[b * rows..][..r]);
                gemm_into(
                    (r, d, m),
                    dq_b,
                    d,
                    false,
                    (ds, 1, m),
                    (k_h, 1, d),
                    scale,
                    Cores::One,
                );
                gemm_into(
                    (m, d, r),
                    dk_h,
                    d,
                    true,
                    (ds, m, 1),
                    (q_b, 1, d),
                    scale,
                    Cores::One,
                );
            }
        });
    Gradients { dq, dk, dv }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention and its gradients in f64 straight from the definitions, one (sample, head)
    /// at a time, on token-major operands.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        s: Shape,
        scale: f64,
    ) -> [Vec<f64>; 4] {
        let Shape {
            batch,
            heads,
            n,
            m,
            d,
            ..
        } = s;
        let c = heads * d;
        let (mut o, mut dq, mut dk, mut dv) = (
            vec![0f64; batch * n * c],
            vec![0f64; batch * n * c],
            vec![0f64; batch * m * c],
            vec![0f64; batch * m * c],
        );
        for b in 0..batch {
            for h in 0..heads {
                let at_q = |i: usize, t: usize| (b * n + i) * c + h * d + t;
                let at_k = |j: usize, t: usize| (b * m + j) * c + h * d + t;
                let qi = |i: usize, t: usize| f64::from(q[at_q(i, t)]);
                let kj = |j: usize, t: usize| f64::from(k[at_k(j, t)]);
                let vj = |j: usize, t: usize| f64::from(v[at_k(j, t)]);
                let gi = |i: usize, t: usize| f64::from(dout[at_q(i, t)]);
                for i in 0..n {
                    let scores: Vec<f64> = (0..m)
                        .map(|j| scale * (0..d).map(|t| qi(i, t) * kj(j, t)).sum::<f64>())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                    for t in 0..d {
                        o[at_q(i, t)] = (0..m).map(|j| p[j] * vj(j, t)).sum();
                    }
                    let dp: Vec<f64> = (0..m)
                        .map(|j| (0..d).map(|t| gi(i, t) * vj(j, t)).sum())
                        .collect();
                    let dot: f64 = (0..m).map(|j| p[j] * dp[j]).sum();
                    for j in 0..m {
                        let ds = p[j] * (dp[j] - dot);
                        for t in 0..d {
                            dq[at_q(i, t)] += scale * ds * kj(j, t);
                            dk[at_k(j, t)] += scale * ds * qi(i, t);
                            dv[at_k(j, t)] += p[j] * gi(i, t);
                        }
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

    /// Self- and cross-attention, one and several samples and heads, blocks that do and do
    /// not divide the rows, one row per block, and the default blocking: output and all three
    /// gradients match the f64 definition.
    #[test]
    fn matches_the_definition_and_its_gradients() {
        for (batch, heads, n, m, d, rows) in [
            (1usize, 3usize, 37usize, 37usize, 8usize, Some(8usize)),
            (2, 2, 29, 11, 5, Some(7)),
            (1, 1, 5, 77, 16, Some(1)),
            (2, 4, 64, 64, 40, None),
        ] {
            let s = Shape::new(batch, heads, (n, m, d), rows);
            let c = heads * d;
            let q = wave(batch * n * c, 0.1, 1.0);
            let k = wave(batch * m * c, 1.3, 2.0);
            let v = wave(batch * m * c, 2.9, 1.0);
            let g = wave(batch * n * c, 4.2, 1.0);
            let scale = 1.0 / (d as f32).sqrt();
            let (o, lse) = forward(&q, &k, &v, s, scale).unwrap();
            let Gradients { dq, dk, dv } = backward(&q, &k, &v, &o, &lse, &g, s, scale).unwrap();
            let [ro, rdq, rdk, rdv] = reference(&q, &k, &v, &g, s, f64::from(scale));
            let case = format!("{batch}x{heads}x{n}x{m}x{d} rows {rows:?}");
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
        let s = Shape::new(1, 1, (4, 4, 2), None);
        let err = forward(&[0.0; 8], &[0.0; 8], &[0.0; 6], s, 1.0).unwrap_err();
        assert!(err.contains("expected 8, 8, 8"), "{err}");
    }
}
