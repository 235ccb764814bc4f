//! The inner loops of the attention passes, as each path provides them.

/// The inner loops of the passes, as each path provides them.
pub(super) trait Inner {
    /// [`super::dot::dot`] of `a` and `b`, bit for bit.
    fn dot(&self, a: &[f32], b: &[f32]) -> f32;

    /// `out[j]` = [`Inner::dot`] of `q` and the key row `k[base + j * stride..][..q.len()]`
    /// for every `j < out.len()`, bit for bit: the scores of one query row against
    /// consecutive key rows. A path may compute several of them at once (the AVX2 one
    /// reduces eight rows' accumulators together), each still in `dot`'s order.
    fn dots(&self, q: &[f32], k: &[f32], base: usize, stride: usize, out: &mut [f32]) {
        let hd = q.len();
        for (j, s) in out.iter_mut().enumerate() {
            let at = base + j * stride;
            *s = self.dot(q, &k[at..at + hd]);
        }
    }

    /// `out[d] += probs[j] * v[base + j * stride + d]` for every key `j` in order, each
    /// product and sum rounded, skipping keys of probability exactly 0 (a masked key
    /// adds nothing to a finite sum; a NaN weight, of a fully masked row, still
    /// reaches the output).
    fn accumulate(&self, out: &mut [f32], probs: &[f32], v: &[f32], base: usize, stride: usize);

    /// Whether any of `codes` is an E4M3 NaN (`s 1111 111`).
    fn has_e4m3_nan(&self, codes: &[u8]) -> bool;

    /// `out[i]` = the value of the E4M3 byte `codes[i]`, exactly (`out` is as long as
    /// `codes`). Unless `nan`, the caller has checked that no code is a NaN, and a
    /// path may read one as any value.
    fn decode_e4m3(&self, codes: &[u8], out: &mut [f32], nan: bool);

    /// [`Inner::accumulate`] over value rows of E4M3 bytes, each decoded exactly: the
    /// same sums as over the same values stored as `f32`, bit for bit (with `nan` as
    /// for [`Inner::decode_e4m3`]).
    #[allow(clippy::too_many_arguments)]
    fn accumulate_e4m3(
        &self,
        out: &mut [f32],
        probs: &[f32],
        v: &[u8],
        base: usize,
        stride: usize,
        nan: bool,
    );
}
