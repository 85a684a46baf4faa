//! Fast elementary functions in plain arithmetic, so that loops over them vectorise.

/// e^x for x in about [−87, 88], relative error below 2e-7: x = n·ln2 + r, e^r by a degree-6
/// polynomial, 2^n by building the exponent bits. Plain arithmetic, so it vectorises.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by adding and subtracting 1.5·2^23 (no libm call, so it vectorises
    // even without SSE4.1's round instruction).
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    // ln 2 in two parts (Cody–Waite), so that n·ln2 is exact enough for large |n|.
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n also sits in the low mantissa bits of `shifted`: build 2^n from those bits with integer
    // operations only (a float-to-int `as` cast saturates, and the compiler turns it into a
    // scalar instruction per element, which stops the loop from vectorising).
    let exponent = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let rel = ((fast_exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 3e-7, "x = {x}: {rel}");
        }
    }
}
