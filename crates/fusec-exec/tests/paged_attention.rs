//! `fused.paged_attention`'s kernel: sequences of different lengths in blocks scattered
//! over one pool, against dense attention over each sequence's own keys and values
//! (bit for bit in `f32`) and an `f64` reference; the new entries land in their
//! blocks' slots and nowhere else; a sliding window reads only its last `W`
//! positions; bad tables and positions are errors, not panics.

use fusec_exec::kernels::attention::{attention, paged_attention, Pages};
use fusec_exec::{KernelError, SplitMix64, Tensor};
use fusec_ir::DType;

const F32: DType = DType::F32;

fn random(shape: &[usize], rng: &mut SplitMix64) -> Tensor {
    let n = shape.iter().product();
    let values = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_f32(F32, shape, values).expect("sizes match")
}

/// The geometry: 3 sequences, 4 query heads over 2 KV heads of 8 values, blocks of 4
/// positions in a pool of 12, tables of 4 blocks.
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 8;
const BS: usize = 4;
const POOL: usize = 12;
const WIDTH: usize = 4;

/// Each sequence's position this step and its blocks, scattered and interleaved
/// (`-1`: not held).
fn layout() -> (Vec<i32>, Vec<i32>) {
    let positions = vec![0, 9, 14];
    #[rustfmt::skip]
    let table = vec![
        7, -1, -1, -1,
        3, 11, 0, -1,
        5, 1, 10, 2,
    ];
    (positions, table)
}

/// Sequence `b`'s keys or values for positions `start ..= p`, `[1, KV, len, HD]`, read
/// from the pool as the table says.
fn gather(pool: &Tensor, table: &[i32], b: usize, start: usize, p: usize) -> Tensor {
    let mut out = Vec::new();
    for h in 0..KV {
        for j in start..=p {
            let block = table[b * WIDTH + j / BS] as usize;
            for d in 0..HD {
                out.push(pool.get(&[block, h, j % BS, d]).expect("in pool") as f32);
            }
        }
    }
    Tensor::from_f32(F32, &[1, KV, p + 1 - start, HD], out).expect("sizes")
}

fn row(t: &Tensor, b: usize) -> Tensor {
    let s = t.shape();
    let n: usize = s[1..].iter().product();
    let all = t.to_vec_f32();
    let mut shape = s.to_vec();
    shape[0] = 1;
    Tensor::from_f32(F32, &shape, all[b * n..(b + 1) * n].to_vec()).expect("sizes")
}

/// `softmax(q k^T * scale) v` in `f64` for one sequence (`q` `[1,H,1,HD]`).
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Vec<f64> {
    let len = k.shape()[2];
    let mut out = Vec::new();
    for h in 0..HEADS {
        let kvh = h / (HEADS / KV);
        let scores: Vec<f64> = (0..len)
            .map(|j| {
                (0..HD)
                    .map(|d| q.get(&[0, h, 0, d]).expect("q") * k.get(&[0, kvh, j, d]).expect("k"))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        for d in 0..HD {
            out.push(
                (0..len)
                    .map(|j| e[j] / sum * v.get(&[0, kvh, j, d]).expect("v"))
                    .sum(),
            );
        }
    }
    out
}

fn run(window: Option<usize>) {
    let mut rng = SplitMix64::new(7);
    let (positions, mut table) = layout();
    // Blocks wholly before a window are not held (the session frees them).
    if let Some(w) = window {
        for (s, &p) in positions.iter().enumerate() {
            let start = (p as usize + 1).saturating_sub(w);
            for i in 0..start / BS {
                table[s * WIDTH + i] = -1;
            }
        }
    }
    let b = positions.len();
    let q = random(&[b, HEADS, 1, HD], &mut rng);
    let k = random(&[b, KV, 1, HD], &mut rng);
    let v = random(&[b, KV, 1, HD], &mut rng);
    let mut pool_k = random(&[POOL, KV, BS, HD], &mut rng);
    let mut pool_v = random(&[POOL, KV, BS, HD], &mut rng);
    let (before_k, before_v) = (pool_k.to_vec_f32(), pool_v.to_vec_f32());
    let table_t = Tensor::from_i32(&[b, WIDTH], table.clone()).expect("sizes");
    let positions_t = Tensor::from_i32(&[b, 1], positions.clone()).expect("sizes");
    let scale = 0.35f32;
    let (out, copied, _) = paged_attention(
        &q,
        Pages {
            k: &k,
            v: &v,
            pool_k: &mut pool_k,
            pool_v: &mut pool_v,
            table: &table_t,
            positions: &positions_t,
        },
        scale,
        window,
    )
    .expect("runs");
    assert_eq!(copied, 0, "a pool held only here is written in place");
    // The new entries are in their slots; nothing else changed.
    for (pool, before, new) in [(&pool_k, &before_k, &k), (&pool_v, &before_v, &v)] {
        let mut expected = before.clone();
        for (s, &p) in positions.iter().enumerate() {
            let p = p as usize;
            let block = table[s * WIDTH + p / BS] as usize;
            for h in 0..KV {
                for d in 0..HD {
                    let at = ((block * KV + h) * BS + p % BS) * HD + d;
                    expected[at] = new.get(&[s, h, 0, d]).expect("new") as f32;
                }
            }
        }
        assert_eq!(&pool.to_vec_f32(), &expected);
    }
    // Each sequence: dense attention over its own positions, bit for bit, and the
    // f64 reference.
    for (s, &p) in positions.iter().enumerate() {
        let p = p as usize;
        let start = window.map_or(0, |w| (p + 1).saturating_sub(w));
        let ks = gather(&pool_k, &table, s, start, p);
        let vs = gather(&pool_v, &table, s, start, p);
        let len = p + 1 - start;
        let mask = Tensor::from_f32(F32, &[1, 1, 1, len], vec![0.0; len]).expect("mask");
        let qs = row(&q, s);
        let dense = attention(&qs, &ks, &vs, scale, &mask, None).expect("dense");
        let got = row(&out, s);
        assert_eq!(got.to_vec_f32(), dense.to_vec_f32(), "sequence {s}");
        let r = reference(&qs, &ks, &vs, f64::from(scale));
        for (a, e) in got.to_vec_f32().iter().zip(&r) {
            assert!(
                (f64::from(*a) - e).abs() <= 1e-5 * e.abs().max(1.0),
                "{a} vs {e}"
            );
        }
    }
}

#[test]
fn ragged_sequences_in_scattered_blocks_match_dense_attention() {
    run(None);
}

#[test]
fn a_sliding_window_reads_only_its_last_positions() {
    // Sequence 2 at position 14 reads 9..=14 and sequence 1 at 9 reads 4..=9: the
    // blocks before those are not held (`-1` in the table) and not read.
    run(Some(6));
}

#[test]
fn bad_tables_and_positions_are_errors() {
    let mut rng = SplitMix64::new(1);
    let q = random(&[1, HEADS, 1, HD], &mut rng);
    let k = random(&[1, KV, 1, HD], &mut rng);
    let v = random(&[1, KV, 1, HD], &mut rng);
    let call = |table: Vec<i32>, position: i32| -> Result<(), KernelError> {
        let mut pool_k = random(&[POOL, KV, BS, HD], &mut SplitMix64::new(2));
        let mut pool_v = random(&[POOL, KV, BS, HD], &mut SplitMix64::new(3));
        let table = Tensor::from_i32(&[1, WIDTH], table).expect("sizes");
        let positions = Tensor::from_i32(&[1, 1], vec![position]).expect("sizes");
        paged_attention(
            &q,
            Pages {
                k: &k,
                v: &v,
                pool_k: &mut pool_k,
                pool_v: &mut pool_v,
                table: &table,
                positions: &positions,
            },
            0.5,
            None,
        )
        .map(|_| ())
    };
    assert!(call(vec![0, 1, 2, 3], 15).is_ok());
    // A block outside the pool, a block not held, a negative position, a position
    // past the table.
    assert!(call(vec![0, 12, 2, 3], 5).is_err());
    assert!(call(vec![0, -1, 2, 3], 5).is_err());
    assert!(call(vec![0, 1, 2, 3], -1).is_err());
    assert!(call(vec![0, 1, 2, 3], 16).is_err());
}
