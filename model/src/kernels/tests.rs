//! The fused kernels against their candle compositions, values and gradients.

use super::{activation::*, base::*, dropout::*, norm::*, rope::*, softmax::*};
use crate::dropout::Dropout;
use crate::testing::{grads, max_diff, values};
use candle_core::{DType, Device, Tensor, Var, D};

#[test]
fn fused_softmax_and_its_gradient_match_the_composition() {
    let dev = Device::Cpu;
    let (b, h, t) = (2, 3, 5);
    let scores = Var::from_vec(values(b * h * t * t, 0.37), (b, h, t, t), &dev).unwrap();
    // Causal for batch row 0, plus a fully masked query row (padding) in batch row 1.
    let mut mask = vec![0.0; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                if j > i || (bi == 1 && i == 4) {
                    mask[(bi * t + i) * t + j] = -1e9;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, t, t), &dev).unwrap();
    let w = Tensor::from_vec(values(b * h * t * t, 0.91), (b, h, t, t), &dev).unwrap();

    let fused = masked_softmax(&scores, &mask).unwrap();
    let composed =
        candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
    let diff = max_diff;
    assert!(diff(&fused, &composed) < 1e-14);
    let g_fused = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g_composed = (composed * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (gf, gc) = (
        g_fused.get(scores.as_tensor()).unwrap(),
        g_composed.get(scores.as_tensor()).unwrap(),
    );
    assert!(diff(gf, gc) < 1e-12, "{}", diff(gf, gc));
    assert!(diff(gf, &gf.zeros_like().unwrap()) > 1e-3);

    // A mask shared by the batch, in f32.
    let scores32 = scores.to_dtype(DType::F32).unwrap();
    let shared = mask.narrow(0, 0, 1).unwrap().to_dtype(DType::F32).unwrap();
    let fused = masked_softmax(&scores32, &shared).unwrap();
    let composed =
        candle_nn::ops::softmax(&scores32.broadcast_add(&shared).unwrap(), D::Minus1).unwrap();
    assert!(max_diff(&fused, &composed) < 1e-6);
}

/// Value and gradient of `sum(f(x) * w)` for a fused op and its candle composition, in f64.
fn check_fused(fused: impl Fn(&Tensor) -> Tensor, composed: impl Fn(&Tensor) -> Tensor, tol: f64) {
    let dev = Device::Cpu;
    let (rows, n) = (7, 33);
    let x = Var::from_vec(values(rows * n, 0.53), (rows, n), &dev).unwrap();
    let w = Tensor::from_vec(values(rows * n, 1.7), (rows, n), &dev).unwrap();
    let (yf, yc) = (fused(x.as_tensor()), composed(x.as_tensor()));
    assert!(max_diff(&yf, &yc) < tol, "values {}", max_diff(&yf, &yc));
    let grad = |y: Tensor| {
        (y * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .clone()
    };
    let (gf, gc) = (grad(yf), grad(yc));
    assert!(max_diff(&gf, &gc) < tol, "gradients {}", max_diff(&gf, &gc));
    assert!(max_diff(&gf, &gf.zeros_like().unwrap()) > 1e-3);
    // f32 takes the same kernels.
    let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
    assert!(max_diff(&fused(&x32), &composed(&x32)) < 1e-5);
}

#[test]
fn element_wise_kernels_refuse_inputs_of_different_lengths() {
    let dev = Device::Cpu;
    let a = Tensor::ones(8, DType::F32, &dev).unwrap();
    let b = Tensor::ones(6, DType::F32, &dev).unwrap();
    let err = a.apply_op2_no_bwd(&b, &SiluMul).unwrap_err().to_string();
    assert!(err.contains("inputs of 8 and 6 elements"), "{err}");
}

#[test]
fn residual_dropout_gives_the_compositions_values_and_gradients_bit_for_bit() {
    let dev = Device::Cpu;
    // Several chunks, so the draws of a chunk that seeks its stream are checked too.
    let n = 3 * CHUNK + 77;
    for dtype in [DType::F32, DType::F64] {
        let var = |seed| {
            Var::from_tensor(
                &Tensor::from_vec(values(n, seed), n, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap()
        };
        let (x, h) = (var(0.53), var(0.91));
        let w = Tensor::from_vec(values(n, 1.7), n, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let d = Dropout {
            p: 0.3,
            seed: 11,
            site: 4,
        };
        let fused = residual_dropout(x.as_tensor(), h.as_tensor(), &d).unwrap();
        let composed = (x.as_tensor() + d.apply(h.as_tensor()).unwrap()).unwrap();
        let bits = |t: &Tensor| -> Vec<u64> {
            let v: Vec<f64> = t.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&fused), bits(&composed), "{dtype:?} values");
        let (gf, gc) = (
            grads(&fused, &w, &[&x, &h]),
            grads(&composed, &w, &[&x, &h]),
        );
        for (a, b) in gf.iter().zip(&gc) {
            assert_eq!(bits(a), bits(b), "{dtype:?} gradients");
        }
        let dropped = bits(&gf[1])
            .iter()
            .filter(|&&b| f64::from_bits(b) == 0.0)
            .count();
        assert!(
            (dropped as f64 / n as f64 - 0.3).abs() < 0.02,
            "{dropped} of {n}"
        );
    }
}

#[test]
fn fused_gelu_matches_candle_gelu_and_its_exact_gradient() {
    // candle's own GELU backward rounds its constants (0.0356774, 0.797885, ...), so its
    // gradient is off by ~1e-6; ours is the exact derivative, checked by finite differences.
    check_fused(|x| gelu(x).unwrap(), |x| x.gelu().unwrap(), 1e-5);
    let xs = values(64, 0.29);
    let x = Var::from_vec(xs.clone(), 64, &Device::Cpu).unwrap();
    let g = gelu(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f64> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    let f = |v: f64| 0.5 * v * (1.0 + (GELU_C * (v + GELU_K * v * v * v)).tanh());
    for (v, g) in xs.iter().zip(g) {
        let h = 1e-6;
        let fd = (f(v + h) - f(v - h)) / (2.0 * h);
        assert!((fd - g).abs() < 1e-8, "x {v}: {g} vs {fd}");
    }
}

#[test]
fn fused_rope_matches_the_composition_and_its_gradient() {
    let dev = Device::Cpu;
    let (b, t, h, d) = (2, 5, 3, 8);
    let x = Var::from_vec(values(b * t * h * d, 0.37), (b, t, h, d), &dev).unwrap();
    let (cs, sn) = (values(b * t * d / 2, 0.91), values(b * t * d / 2, 1.3));
    let half = |v: &[f64], sign: f64| {
        let v = Tensor::from_vec(v.to_vec(), (b, t, 1, d / 2), &dev).unwrap();
        Tensor::cat(&[(&v * sign).unwrap(), v], 3).unwrap()
    };
    let (cos, sin) = (half(&cs, 1.0), half(&sn, -1.0));
    let fused = rope_heads_first(x.as_tensor(), &cos, &sin)
        .unwrap()
        .unwrap();
    let composed = crate::ops::apply_rope(x.as_tensor(), &cos, &sin)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap();
    assert_eq!(fused.dims(), [b, h, t, d]);
    assert!(max_diff(&fused, &composed) < 1e-12);
    let w = Tensor::from_vec(values(b * t * h * d, 1.7), (b, h, t, d), &dev).unwrap();
    let (gf, gc) = (
        grads(&fused, &w, &[&x]).remove(0),
        grads(&composed, &w, &[&x]).remove(0),
    );
    assert!(max_diff(&gf, &gc) < 1e-12, "{}", max_diff(&gf, &gc));
    assert!(max_diff(&gf, &gf.zeros_like().unwrap()) > 1e-3);
    // f32 takes the same kernel; other shapes of table fall back.
    let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let f32_out = rope_heads_first(&to32(x.as_tensor()), &to32(&cos), &to32(&sin))
        .unwrap()
        .unwrap();
    assert!(max_diff(&f32_out.to_dtype(DType::F64).unwrap(), &composed) < 1e-5);
    let narrow = cos.narrow(0, 0, 1).unwrap();
    assert!(rope_heads_first(x.as_tensor(), &narrow, &sin)
        .unwrap()
        .is_none());
}

#[test]
fn fused_silu_mul_matches_the_composition_and_its_gradients() {
    let dev = Device::Cpu;
    let (rows, n) = (7, 33);
    // Wide enough (|x| up to ~90) to reach both branches of the stable sigmoid.
    let big: Vec<f64> = values(rows * n, 0.53).iter().map(|v| v * 30.0).collect();
    let gate = Var::from_vec(big, (rows, n), &dev).unwrap();
    let up = Var::from_vec(values(rows * n, 0.71), (rows, n), &dev).unwrap();
    let w = Tensor::from_vec(values(rows * n, 1.7), (rows, n), &dev).unwrap();
    let fused = silu_mul(gate.as_tensor(), up.as_tensor()).unwrap();
    let composed = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
    assert!(max_diff(&fused, &composed) < 1e-10);
    let gf = grads(&fused, &w, &[&gate, &up]);
    let gc = grads(&composed, &w, &[&gate, &up]);
    for (f, c) in gf.iter().zip(&gc) {
        assert!(max_diff(f, c) < 1e-10, "{}", max_diff(f, c));
        assert!(max_diff(f, &f.zeros_like().unwrap()) > 1e-3);
    }
    let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let f32_out = silu_mul(&to32(gate.as_tensor()), &to32(up.as_tensor())).unwrap();
    assert!(max_diff(&f32_out.to_dtype(DType::F64).unwrap(), &composed) < 1e-4 * 30.0);
}

#[test]
fn fused_norms_match_the_composition_and_their_gradients() {
    let eps = 1e-5;
    let composed_ln = |x: &Tensor| {
        let c = x
            .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        c.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
    };
    check_fused(|x| layer_norm_core(x, eps).unwrap(), composed_ln, 1e-12);
    let composed_rms = |x: &Tensor| {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap()
    };
    check_fused(|x| rms_norm_core(x, eps).unwrap(), composed_rms, 1e-12);
}
