//! Test support: a fused operation against the separate operations it replaces, in values and
//! in every weight's gradient (`pixelcnn`'s and `transformer`'s networks).

use candle_core::{DType, Device, Tensor};

use crate::core::params::Params;
use crate::rng::Rng;

/// Adds N(0, 0.3²) noise to every weight under `params`: fresh biases are zero and norms one,
/// which would hide one read from the wrong place.
pub fn perturb(params: &Params, dtype: DType, rng: &mut Rng) {
    for (_, var) in params.named() {
        let noise: Vec<f64> = (0..var.elem_count()).map(|_| 0.3 * rng.normal()).collect();
        let noise = Tensor::from_vec(noise, var.shape(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
}

/// The largest |a − b|.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    scale(&(a - b).unwrap())
}

/// The largest |t|.
pub fn scale(t: &Tensor) -> f64 {
    let m = t.abs().unwrap().flatten_all().unwrap().to_dtype(DType::F64).unwrap().max(0).unwrap();
    m.to_scalar::<f64>().unwrap()
}

/// `fused` and `separate`, the same model's outputs for the same input, agree within `tolerance`
/// of their scale; so do the gradients of every weight under `params` for a random weighting of
/// the outputs (drawn from `rng`, so that the check is the same every run).
pub fn assert_agree(params: &Params, fused: &Tensor, separate: &Tensor, tolerance: f64, rng: &mut Rng) {
    let err = max_diff(fused, separate);
    assert!(err <= tolerance * scale(separate), "outputs differ by {err}");
    let probe: Vec<f64> = (0..fused.elem_count()).map(|_| rng.normal()).collect();
    let probe = Tensor::from_vec(probe, fused.shape(), &Device::Cpu).unwrap().to_dtype(fused.dtype()).unwrap();
    let g_fused = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g_separate = (separate * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in params.named() {
        let (a, b) = (g_fused.get(&var).unwrap(), g_separate.get(&var).unwrap());
        assert!(max_diff(a, b) <= tolerance * scale(b), "{name}: gradients differ by {}", max_diff(a, b));
    }
}
