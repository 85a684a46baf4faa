//! The engine's arithmetic on plain `f32` slices: `y += x·W` for a few rows `x`, and the
//! activations. Each kernel is compiled several times, for AVX-512, for AVX2 with FMA and for
//! any CPU, and [`Kernels::detect`] picks the best one the machine has at run time, so one
//! binary runs everywhere and uses what it finds.

use crate::fastmath::fast_exp;

/// `y (rows × out) += x (rows × in) · w (in × out)`, arguments `(y, x, w, rows, in, out)`.
pub type MatmulAcc = fn(&mut [f32], &[f32], &[f32], usize, usize, usize);

/// The kernels chosen for this CPU.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// See [`MatmulAcc`].
    pub matmul_acc: MatmulAcc,
    /// The gated unit of `rows` rows: `pre (rows × 2g)` → `z (rows × g)`, z = tanh(f)·σ(g).
    pub gate: fn(pre: &[f32], z: &mut [f32], g: usize, exact: bool),
    /// The instruction set in use.
    pub name: &'static str,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// The body of `matmul_acc`, instantiated per instruction set. `$madd(a, b, c)` is a·b + c.
/// Outputs are done in tiles of 64, 32 or 16 columns whose accumulators stay in registers
/// while the whole input row is read; one tile of W (in × width) is then reused from L1 by
/// every row of x. `$split` independent accumulator sets, each taking every `$split`-th
/// input, keep enough FMAs in flight to hide their latency (16 registers of AVX2 fit one
/// set of 64 columns; the 32 of AVX-512 fit two); with several rows, two rows share each
/// load of W instead.
macro_rules! matmul_body {
    ($y:ident, $x:ident, $w:ident, $rows:ident, $inp:ident, $out:ident, $split:literal, $madd:expr) => {{
        let madd = $madd;
        macro_rules! tile {
            ($o:expr, $width:literal, $s:literal) => {{
                let mut r = 0;
                // With two accumulator sets to spare, two rows share each load of W instead.
                if $s >= 2 {
                    while r + 1 < $rows {
                        let (xa, xb) = (&$x[r * $inp..(r + 1) * $inp], &$x[(r + 1) * $inp..(r + 2) * $inp]);
                        let mut acc = [[0f32; $width]; 2];
                        acc[0].copy_from_slice(&$y[r * $out + $o..r * $out + $o + $width]);
                        acc[1].copy_from_slice(&$y[(r + 1) * $out + $o..(r + 1) * $out + $o + $width]);
                        for i in 0..$inp {
                            let wr = &$w[i * $out + $o..i * $out + $o + $width];
                            let (a, b) = (xa[i], xb[i]);
                            for k in 0..$width {
                                acc[0][k] = madd(a, wr[k], acc[0][k]);
                                acc[1][k] = madd(b, wr[k], acc[1][k]);
                            }
                        }
                        $y[r * $out + $o..r * $out + $o + $width].copy_from_slice(&acc[0]);
                        $y[(r + 1) * $out + $o..(r + 1) * $out + $o + $width].copy_from_slice(&acc[1]);
                        r += 2;
                    }
                }
                for r in r..$rows {
                    let xr = &$x[r * $inp..(r + 1) * $inp];
                    let yr = &mut $y[r * $out + $o..r * $out + $o + $width];
                    let mut acc = [[0f32; $width]; $s];
                    acc[0].copy_from_slice(yr);
                    let full = $inp / $s * $s;
                    for i in (0..full).step_by($s) {
                        for s in 0..$s {
                            let xi = xr[i + s];
                            let wr = &$w[(i + s) * $out + $o..(i + s) * $out + $o + $width];
                            for k in 0..$width {
                                acc[s][k] = madd(xi, wr[k], acc[s][k]);
                            }
                        }
                    }
                    for i in full..$inp {
                        let wr = &$w[i * $out + $o..i * $out + $o + $width];
                        for k in 0..$width {
                            acc[0][k] = madd(xr[i], wr[k], acc[0][k]);
                        }
                    }
                    for s in 1..acc.len() {
                        for k in 0..$width {
                            acc[0][k] += acc[s][k];
                        }
                    }
                    yr.copy_from_slice(&acc[0]);
                }
            }};
        }
        let mut o = 0;
        while o + 64 <= $out {
            tile!(o, 64, $split);
            o += 64;
        }
        if o + 32 <= $out {
            tile!(o, 32, 2);
            o += 32;
        }
        while o + 16 <= $out {
            tile!(o, 16, 4);
            o += 16;
        }
        if o < $out {
            for r in 0..$rows {
                for i in 0..$inp {
                    let xi = $x[r * $inp + i];
                    for k in o..$out {
                        $y[r * $out + k] = madd(xi, $w[i * $out + k], $y[r * $out + k]);
                    }
                }
            }
        }
    }};
}

#[inline(always)]
fn gate_exact(f: f32, g: f32) -> f32 {
    f.tanh() * (1.0 / (1.0 + (-g).exp()))
}

/// tanh(f)·σ(g) = (e^{2f} − 1) / ((e^{2f} + 1)(1 + e^{−g})): two fast exponentials and one
/// division (divisions are the slow part of this loop). The clamps keep the product finite;
/// tanh(±9) and σ(±30) are ±1, 1 and 0 to within 1e-7.
#[inline(always)]
fn gate_fast(f: f32, g: f32) -> f32 {
    let e = fast_exp(2.0 * f.clamp(-9.0, 9.0));
    let d = 1.0 + fast_exp(-g.clamp(-30.0, 30.0));
    (e - 1.0) / ((e + 1.0) * d)
}

macro_rules! gate_body {
    ($pre:ident, $z:ident, $g:ident, $exact:ident) => {{
        for (row, zr) in $pre.chunks_exact(2 * $g).zip($z.chunks_exact_mut($g)) {
            let (f, gt) = row.split_at($g);
            if $exact {
                for k in 0..$g {
                    zr[k] = gate_exact(f[k], gt[k]);
                }
            } else {
                for k in 0..$g {
                    zr[k] = gate_fast(f[k], gt[k]);
                }
            }
        }
    }};
}

fn matmul_portable(y: &mut [f32], x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) {
    matmul_body!(y, x, w, rows, inp, out, 1, |a: f32, b: f32, c: f32| a * b + c)
}

fn gate_portable(pre: &[f32], z: &mut [f32], g: usize, exact: bool) {
    gate_body!(pre, z, g, exact)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// One kernel set compiled for `$features`, offered only where the CPU has them.
    macro_rules! kernel_set {
        ($name:ident, $label:literal, $features:literal, $split:literal, [$($detect:tt),+]) => {
            pub fn $name() -> Option<Kernels> {
                #[target_feature(enable = $features)]
                unsafe fn matmul(y: &mut [f32], x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) {
                    matmul_body!(y, x, w, rows, inp, out, $split, |a: f32, b: f32, c: f32| a.mul_add(b, c))
                }
                #[target_feature(enable = $features)]
                unsafe fn gate(pre: &[f32], z: &mut [f32], g: usize, exact: bool) {
                    gate_body!(pre, z, g, exact)
                }
                let present = true $(&& std::arch::is_x86_feature_detected!($detect))+;
                // SAFETY: the closures only run on a CPU with the features, checked just above.
                present.then_some(Kernels {
                    matmul_acc: |y, x, w, r, i, o| unsafe { matmul(y, x, w, r, i, o) },
                    gate: |p, z, g, e| unsafe { gate(p, z, g, e) },
                    name: $label,
                })
            }
        };
    }

    kernel_set!(avx512, "avx512", "avx512f,avx512vl,avx2,fma", 2, ["avx512f", "avx512vl", "avx2", "fma"]);
    kernel_set!(avx2, "avx2+fma", "avx2,fma", 1, ["avx2", "fma"]);
}

impl Kernels {
    /// Kernels without any instruction-set extension beyond the target's baseline.
    pub fn portable() -> Self {
        Kernels { matmul_acc: matmul_portable, gate: gate_portable, name: "portable" }
    }

    /// The best kernels for this CPU (`WAVEGEN_KERNELS=portable|avx2` forces a lesser set).
    pub fn detect() -> Self {
        let wanted = std::env::var("WAVEGEN_KERNELS").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            if (wanted.is_empty() || wanted == "avx512")
                && let Some(k) = x86::avx512()
            {
                return k;
            }
            if (wanted.is_empty() || wanted == "avx512" || wanted == "avx2")
                && let Some(k) = x86::avx2()
            {
                return k;
            }
        }
        let _ = wanted;
        Kernels::portable()
    }

    /// Every kernel set this CPU can run (for tests and benchmarks).
    pub fn available() -> Vec<Self> {
        let mut all = vec![Kernels::portable()];
        #[cfg(target_arch = "x86_64")]
        all.extend([x86::avx2(), x86::avx512()].into_iter().flatten());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_set_computes_the_same_product_and_gate() {
        let (rows, inp, out) = (3, 37, 150); // a full tile, a partial tile, odd sizes
        let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
        let w: Vec<f32> = (0..inp * out).map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0).collect();
        let mut expected = vec![0.5f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                expected[r * out + o] += (0..inp).map(|i| x[r * inp + i] * w[i * out + o]).sum::<f32>();
            }
        }
        let pre: Vec<f32> = (0..2 * 40).map(|i| (i as f32 - 40.0) / 4.0).collect();
        for k in Kernels::available() {
            let mut y = vec![0.5f32; rows * out];
            (k.matmul_acc)(&mut y, &x, &w, rows, inp, out);
            let err = y.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-4, "{}: {err}", k.name);
            for exact in [true, false] {
                let mut z = vec![0f32; 40];
                (k.gate)(&pre, &mut z, 40, exact);
                for i in 0..40 {
                    let want = (pre[i] as f64).tanh() / (1.0 + (-pre[40 + i] as f64).exp());
                    assert!((z[i] as f64 - want).abs() < 1e-6, "{} exact={exact}: {} vs {want}", k.name, z[i]);
                }
            }
        }
    }
}
