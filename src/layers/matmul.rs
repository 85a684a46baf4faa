//! The matrix products of the fused training ops: `dst += a × b` into a row-major buffer, the
//! operands strided views (a transpose is a view, not a copy). Two ways to compute them:
//!
//! - [`Exact`]: the `gemm` crate, which candle itself uses on the CPU. It handles strided
//!   operands without copies and picks AVX-512/AVX2/NEON kernels at run time; f32 or f64.
//! - [`Bf16`]: the AMX tile unit of recent Xeons (`--precision bf16`). The operands are rounded
//!   to bfloat16 and packed into the tile layouts, the products are summed in f32. A tile
//!   product (16 × 16 outputs, 32 deep) does in one instruction what takes AVX-512 sixteen FMAs
//!   per row; packing costs one pass over each operand.

/// A row-major matrix view: pointer, rows, columns, row and column strides; `t()` is its
/// transpose (the same memory).
pub struct Mat<T> {
    ptr: *const T,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

// By hand: a view is Copy whatever `T` is (derive would ask `T: Copy`).
impl<T> Clone for Mat<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Mat<T> {}

impl<T> Mat<T> {
    /// `rows × cols` of `data`, row-major from `offset`.
    pub fn new(data: &[T], offset: usize, rows: usize, cols: usize) -> Self {
        assert!(offset + rows * cols <= data.len(), "invariant: the view lies inside its buffer");
        Mat { ptr: data[offset..].as_ptr(), rows, cols, row_stride: cols as isize, col_stride: 1 }
    }

    /// The transpose: the same memory, strides swapped.
    pub fn t(self) -> Self {
        Mat {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// `rows × cols` of `data` from `offset`, rows `row_stride` apart (a block of columns of a
    /// wider matrix).
    pub fn strided(data: &[T], offset: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(cols <= row_stride || rows <= 1, "invariant: rows do not overlap");
        assert!(rows == 0 || offset + (rows - 1) * row_stride + cols <= data.len(), "invariant: inside the buffer");
        Mat { ptr: data[offset..].as_ptr(), rows, cols, row_stride: row_stride as isize, col_stride: 1 }
    }

    /// Rows `start .. start + count` of the view.
    pub fn row_range(self, start: usize, count: usize) -> Self {
        assert!(start + count <= self.rows, "invariant: the rows lie inside the view");
        // SAFETY: the new first row lies inside the view (checked above).
        Mat { ptr: unsafe { self.ptr.offset(start as isize * self.row_stride) }, rows: count, ..self }
    }

    /// Columns `start .. start + count` of the view.
    pub fn col_range(self, start: usize, count: usize) -> Self {
        assert!(start + count <= self.cols, "invariant: the columns lie inside the view");
        // SAFETY: the new first column lies inside the view (checked above).
        Mat { ptr: unsafe { self.ptr.offset(start as isize * self.col_stride) }, cols: count, ..self }
    }

    /// Element (i, j); `i < rows`, `j < cols`.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        // SAFETY (caller): the indices are inside the view, which lies inside its buffer.
        unsafe { *self.ptr.offset(i as isize * self.row_stride + j as isize * self.col_stride) }
    }
}

/// The number types the products run in.
pub trait Scalar: Copy + Default + Send + Sync + 'static {
    /// 1, the products' α and β.
    const ONE: Self;
}

impl Scalar for f32 {
    const ONE: f32 = 1.0;
}

impl Scalar for f64 {
    const ONE: f64 = 1.0;
}

/// One way of computing `dst[offset..] (a.rows × b.cols, row-major) += a × b`.
pub trait Products<T> {
    /// A right-hand operand made ready once for many products with its leading rows and
    /// columns (attention's blocks of queries each meet the keys they may see).
    type Prepared;

    /// `dst[offset..] += a × b`.
    fn acc(dst: &mut [T], offset: usize, a: Mat<T>, b: Mat<T>);

    /// `b (k × n)` made ready for [`Products::acc_prepared`]. Its entries must be finite: a
    /// product may multiply the rows past its depth by zeros.
    fn prepare(b: Mat<T>) -> Self::Prepared;

    /// `dst[offset..] (a.rows × n) += a × b[..a.cols, ..n]`, the leading rows and columns of
    /// a prepared `b`.
    fn acc_prepared(dst: &mut [T], offset: usize, a: Mat<T>, b: &Self::Prepared, n: usize);

    /// The same product written over `dst[offset..]` (`=`, not `+=`): it need not be cleared.
    fn set_prepared(dst: &mut [T], offset: usize, a: Mat<T>, b: &Self::Prepared, n: usize);

    /// The same, where `a` is the previous product's `a` on this thread, unchanged since, or
    /// its first rows or columns (same memory and strides): a way that prepares its operands
    /// may reuse that work.
    fn acc_again(dst: &mut [T], offset: usize, a: Mat<T>, b: Mat<T>) {
        Self::acc(dst, offset, a, b)
    }

    /// A dilated convolution, one output row per input row: row t of `dst[offset..]` (n
    /// columns) += Σ over `taps` (o, W) of `x[t + o] × W`, rows of `x` outside it counting as
    /// zero. A way may sum all taps before touching `dst`.
    fn conv_acc(dst: &mut [T], offset: usize, x: Mat<T>, taps: &[(isize, Mat<T>)]) {
        for &(o, w) in taps {
            let skip = o.unsigned_abs();
            if skip >= x.rows {
                continue;
            }
            let rows = x.rows - skip;
            if o <= 0 {
                Self::acc(dst, offset + skip * w.cols, x.row_range(0, rows), w);
            } else {
                Self::acc(dst, offset, x.row_range(skip, rows), w);
            }
        }
    }

    /// The same convolution written over `dst[offset..]` (`=`, not `+=`: it need not be
    /// cleared). Every row of the range is written, taps reaching it or not.
    fn conv_set(dst: &mut [T], offset: usize, x: Mat<T>, taps: &[(isize, Mat<T>)])
    where
        T: Default + Copy,
    {
        let n = taps.first().map_or(0, |(_, w)| w.cols);
        dst[offset..offset + x.rows * n].fill(T::default());
        Self::conv_acc(dst, offset, x, taps)
    }

    /// The weight gradients of such a convolution over one sequence: for each tap k,
    /// `dst[offset + k·C·N ..] (C × N) += Σ_r x[r + o_k]ᵀ dy[r]` over the rows r of `dy (R × N)`
    /// whose `r + o_k` is a row of `x (R × C)`. A way may prepare `x` and `dy` once for all taps.
    fn conv_weight_acc(dst: &mut [T], offset: usize, x: Mat<T>, dy: Mat<T>, offsets: &[isize]) {
        let (r, size) = (x.rows, x.cols * dy.cols);
        for (k, &o) in offsets.iter().enumerate() {
            let reach = o.unsigned_abs();
            if reach >= r {
                continue;
            }
            let (x_start, y_start) = if o >= 0 { (reach, 0) } else { (0, reach) };
            Self::acc(dst, offset + k * size, x.row_range(x_start, r - reach).t(), dy.row_range(y_start, r - reach));
        }
    }
}

/// Products in the operands' own precision, by the `gemm` crate.
pub struct Exact;

impl<T: Scalar> Products<T> for Exact {
    /// The view itself: `gemm` reads strided operands as they are.
    type Prepared = Mat<T>;

    fn prepare(b: Mat<T>) -> Mat<T> {
        b
    }

    fn acc_prepared(dst: &mut [T], offset: usize, a: Mat<T>, b: &Mat<T>, n: usize) {
        Self::acc(dst, offset, a, b.row_range(0, a.cols).col_range(0, n))
    }

    fn set_prepared(dst: &mut [T], offset: usize, a: Mat<T>, b: &Mat<T>, n: usize) {
        exact(dst, offset, a, b.row_range(0, a.cols).col_range(0, n), false)
    }

    fn acc(dst: &mut [T], offset: usize, a: Mat<T>, b: Mat<T>) {
        exact(dst, offset, a, b, true)
    }
}

/// `dst[offset..] += a × b` by `gemm`, or `=` when not `accumulate`.
fn exact<T: Scalar>(dst: &mut [T], offset: usize, a: Mat<T>, b: Mat<T>, accumulate: bool) {
    let (m, n, k) = check(dst.len(), offset, &a, &b);
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            dst[offset..offset + m * n].fill(T::default());
        }
        return;
    }
    // SAFETY: the operands are views of live slices whose extents were checked on creation
    // (`Mat::new`) and the destination range was checked above; `gemm` reads and writes only
    // within them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst[offset..].as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Products of bfloat16-rounded operands summed in f32, on the AMX tile unit. Callers check
/// [`amx::available`] first.
pub struct Bf16;

impl Products<f32> for Bf16 {
    type Prepared = amx::PackedB;

    fn acc(dst: &mut [f32], offset: usize, a: Mat<f32>, b: Mat<f32>) {
        let (m, n, k) = check(dst.len(), offset, &a, &b);
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        amx::gemm_acc(&mut dst[offset..offset + m * n], a, b, false);
    }

    fn prepare(b: Mat<f32>) -> amx::PackedB {
        amx::PackedB::new(b)
    }

    fn acc_prepared(dst: &mut [f32], offset: usize, a: Mat<f32>, b: &amx::PackedB, n: usize) {
        prepared(dst, offset, a, b, n, false)
    }

    fn set_prepared(dst: &mut [f32], offset: usize, a: Mat<f32>, b: &amx::PackedB, n: usize) {
        prepared(dst, offset, a, b, n, true)
    }

    fn acc_again(dst: &mut [f32], offset: usize, a: Mat<f32>, b: Mat<f32>) {
        let (m, n, k) = check(dst.len(), offset, &a, &b);
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        amx::gemm_acc(&mut dst[offset..offset + m * n], a, b, true);
    }

    fn conv_acc(dst: &mut [f32], offset: usize, x: Mat<f32>, taps: &[(isize, Mat<f32>)]) {
        tile_conv(dst, offset, x, taps, false)
    }

    fn conv_set(dst: &mut [f32], offset: usize, x: Mat<f32>, taps: &[(isize, Mat<f32>)]) {
        tile_conv(dst, offset, x, taps, true)
    }

    fn conv_weight_acc(dst: &mut [f32], offset: usize, x: Mat<f32>, dy: Mat<f32>, offsets: &[isize]) {
        let (r, c, n) = (x.rows, x.cols, dy.cols);
        assert_eq!(dy.rows, r, "invariant: one gradient row per input row");
        assert!(offset + offsets.len() * c * n <= dst.len(), "invariant: the gradients fit their destination");
        if r == 0 || c == 0 || n == 0 || offsets.is_empty() {
            return;
        }
        if x.col_stride != 1 || dy.col_stride != 1 {
            // Views the packing below does not read: tap by tap.
            for (k, &o) in offsets.iter().enumerate() {
                <Self as Products<f32>>::conv_weight_acc(dst, offset + k * c * n, x, dy, &[o]);
            }
            return;
        }
        amx::conv_weight_acc(&mut dst[offset..offset + offsets.len() * c * n], x, dy, offsets);
    }
}

/// [`Bf16`]'s convolutions: `+=`, or `=` with `overwrite`.
fn tile_conv(dst: &mut [f32], offset: usize, x: Mat<f32>, taps: &[(isize, Mat<f32>)], overwrite: bool) {
    let Some(&(_, w0)) = taps.first() else { return };
    let (m, n) = (x.rows, w0.cols);
    for (_, w) in taps {
        check(dst.len(), offset, &x, w);
    }
    let dst = &mut dst[offset..offset + m * n];
    if m == 0 || n == 0 || x.cols == 0 {
        if overwrite {
            dst.fill(0.0);
        }
        return;
    }
    amx::conv_acc(dst, x, taps, overwrite);
}

/// [`Bf16`]'s products with a prepared B: `+=`, or `=` with `overwrite`.
fn prepared(dst: &mut [f32], offset: usize, a: Mat<f32>, b: &amx::PackedB, n: usize, overwrite: bool) {
    let m = a.rows;
    assert!(a.cols <= b.rows && n <= b.cols, "invariant: the product uses a corner of the prepared B");
    assert!(offset + m * n <= dst.len(), "invariant: the product fits its destination");
    let dst = &mut dst[offset..offset + m * n];
    if m == 0 || n == 0 || a.cols == 0 {
        if overwrite {
            dst.fill(0.0);
        }
        return;
    }
    amx::gemm_acc_prepared(dst, a, b, n, overwrite);
}

fn check<T>(dst_len: usize, offset: usize, a: &Mat<T>, b: &Mat<T>) -> (usize, usize, usize) {
    assert_eq!(a.cols, b.rows, "invariant: inner dimensions agree");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(offset + m * n <= dst_len, "invariant: the product fits its destination");
    (m, n, k)
}

/// f32 → bfloat16, rounding to nearest even (the top 16 bits of the f32, rounded).
#[cfg(test)]
fn to_bf16(x: f32) -> u16 {
    (amx::pair(x, 0.0) & 0xffff) as u16
}

/// bfloat16 → f32 (exact).
#[cfg(test)]
fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// The precision a new training run gets unless told: bf16 where the CPU has AMX-BF16 (measured
/// 1.3× the f32 throughput for the same held-out likelihood, see the README), else f32.
pub fn fastest_precision() -> crate::core::train::Precision {
    use crate::core::train::Precision;
    if amx::available() { Precision::Bf16 } else { Precision::F32 }
}

/// The AMX path. Tiles are 16 rows of 64 bytes: an A tile is 16 rows × 32 bf16 (row-major), a B
/// tile 16 rows of 16 column pairs (rows k and k+1 of B interleaved: the "VNNI" layout), a C tile
/// 16 × 16 f32. Both operands are packed once per product into zero-padded tile layouts (so
/// every tile is whole) in per-thread buffers that are reused.
pub mod amx {
    use super::Mat;

    /// Whether this CPU has AMX with bf16 and the kernel lets this process use the tile data
    /// (Linux asks each process to request it once).
    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(imp::enable)
    }

    /// `dst += a × b`; `again`: `a` is (a part of) the previous call's, still packed.
    pub(super) fn gemm_acc(dst: &mut [f32], a: Mat<f32>, b: Mat<f32>, again: bool) {
        assert!(available(), "invariant: the AMX path runs only where amx::available() said so");
        imp::gemm_acc(dst, a, b, again)
    }

    /// A right-hand operand packed once (bf16 pairs, the B tile layout) for many products with
    /// its leading rows and columns.
    pub struct PackedB {
        data: Vec<u32>,
        /// B's rows and columns.
        pub(super) rows: usize,
        pub(super) cols: usize,
        /// Pairs per packed row: the columns rounded up to a tile.
        np: usize,
    }

    impl PackedB {
        pub(super) fn new(b: Mat<f32>) -> Self {
            assert!(available(), "invariant: the AMX path runs only where amx::available() said so");
            let mut data = Vec::new();
            // SAFETY: AMX is available, so the CPU has AVX-512.
            let np = unsafe { pack_b_avx512(&b, &mut data) };
            PackedB { data, rows: b.rows, cols: b.cols, np }
        }
    }

    /// `dst (a.rows × n) += a × b[..a.cols, ..n]`, or `=` with `overwrite`.
    pub(super) fn gemm_acc_prepared(dst: &mut [f32], a: Mat<f32>, b: &PackedB, n: usize, overwrite: bool) {
        assert!(available(), "invariant: the AMX path runs only where amx::available() said so");
        assert!(a.cols <= b.rows && n <= b.cols, "invariant: a corner of B");
        imp::gemm_acc_prepared(dst, a, &b.data, b.np, n, overwrite)
    }

    /// See [`super::Products::conv_acc`] (`=` with `overwrite`); at most 16 taps.
    pub(super) fn conv_acc(dst: &mut [f32], x: Mat<f32>, taps: &[(isize, Mat<f32>)], overwrite: bool) {
        assert!(available(), "invariant: the AMX path runs only where amx::available() said so");
        assert!(taps.len() <= 16, "invariant: at most 16 taps (the kernel width limit)");
        imp::conv_acc(dst, x, taps, overwrite)
    }

    /// See [`super::Products::conv_weight_acc`]; `x` and `dy` with contiguous rows.
    pub(super) fn conv_weight_acc(dst: &mut [f32], x: Mat<f32>, dy: Mat<f32>, offsets: &[isize]) {
        assert!(available(), "invariant: the AMX path runs only where amx::available() said so");
        imp::conv_weight_acc(dst, x, dy, offsets)
    }

    pub(super) const TILE_ROWS: usize = 16;
    pub(super) const TILE_DEPTH: usize = 32;

    pub(super) fn round_up(x: usize, to: usize) -> usize {
        x.div_ceil(to) * to
    }

    /// Two f32 rounded to bfloat16 and packed as one 32-bit pair, `lo` in the low half (the
    /// order a tile row holds them in memory). Plain integer arithmetic, so that the packing
    /// loops vectorise.
    #[inline(always)]
    pub(super) fn pair(lo: f32, hi: f32) -> u32 {
        let round = |x: f32| {
            let bits = x.to_bits();
            bits.wrapping_add(0x7fff + ((bits >> 16) & 1))
        };
        (round(hi) & 0xffff_0000) | (round(lo) >> 16)
    }

    /// Row `r` of a view whose columns are contiguous, as a slice.
    ///
    /// # Safety
    /// `r < m.rows` and `m.col_stride == 1`.
    #[inline(always)]
    unsafe fn row<'a>(m: &Mat<f32>, r: usize) -> &'a [f32] {
        // SAFETY (caller): the row lies inside the view, which lies inside its buffer.
        unsafe { std::slice::from_raw_parts(m.ptr.offset(r as isize * m.row_stride), m.cols) }
    }

    /// A (m × k) as rows of bf16 pairs along k: `round_up(m, 16)` rows of `round_up(k, 32) / 2`
    /// pairs, zero-padded. Returns the padded row length in pairs.
    ///
    /// # Safety
    /// The CPU has AVX-512F (every AMX CPU does).
    #[inline(always)]
    pub(super) unsafe fn pack_a(a: &Mat<f32>, out: &mut Vec<u32>) -> usize {
        let (mp, kq) = (round_up(a.rows, TILE_ROWS), round_up(a.cols, TILE_DEPTH) / 2);
        out.resize(out.len().max(mp * kq), 0);
        // SAFETY (caller): AVX-512F.
        unsafe { pack_a_rows(a, &mut out[..mp * kq], kq) };
        kq
    }

    /// A's rows packed into `out` (rows of `kq` pairs), and every row of `out` after them zeroed.
    ///
    /// # Safety
    /// The CPU has AVX-512F (the transposed case gathers with it).
    #[inline(always)]
    pub(super) unsafe fn pack_a_rows(a: &Mat<f32>, out: &mut [u32], kq: usize) {
        let (m, k) = (a.rows, a.cols);
        assert!(out.len() >= m * kq && 2 * kq >= k, "invariant: the rows fit");
        if a.col_stride == 1 {
            for i in 0..m {
                // SAFETY: i < m, columns contiguous.
                let src = unsafe { row(a, i) };
                let dst = &mut out[i * kq..(i + 1) * kq];
                let (pairs, tail) = src.split_at(k - k % 2);
                for (o, p) in dst.iter_mut().zip(pairs.chunks_exact(2)) {
                    *o = pair(p[0], p[1]);
                }
                dst[k / 2..].fill(0);
                if let Some(&x) = tail.first() {
                    dst[k / 2] = pair(x, 0.0);
                }
            }
        } else if a.row_stride != 1 {
            // Neither layout (no product of the ops): element by element.
            for i in 0..m {
                for q in 0..kq {
                    // SAFETY: indices inside the view.
                    let at = |kk: usize| if kk < k { unsafe { a.at(i, kk) } } else { 0.0 };
                    out[i * kq + q] = pair(at(2 * q), at(2 * q + 1));
                }
            }
        } else {
            // A transposed view: source row kk (contiguous over i) is column kk of A. Walk pairs
            // of source rows, reading contiguously; the writes stride by a row of `out`.
            let src = a.t();
            // Sixteen pairs at a time by gathers (the same rows of 32 source rows stay in L1).
            #[cfg(target_arch = "x86_64")]
            let first = {
                let full = (k / 2) / 16 * 16;
                // SAFETY: the CPU has AVX-512F (this function's contract); the gathers read rows
                // below `full * 2 ≤ k`.
                unsafe { gather_pairs(&src, full, out, kq, 0) };
                full
            };
            #[cfg(not(target_arch = "x86_64"))]
            let first = 0;
            for q in first..kq {
                let zeros = [0.0f32; 0];
                // SAFETY: rows below k exist, columns contiguous (the view is transposed).
                let r0 = if 2 * q < k { unsafe { row(&src, 2 * q) } } else { &zeros };
                let r1 = if 2 * q + 1 < k { unsafe { row(&src, 2 * q + 1) } } else { &zeros };
                match (r0.len(), r1.len()) {
                    (0, _) => (0..m).for_each(|i| out[i * kq + q] = 0),
                    (_, 0) => r0.iter().enumerate().for_each(|(i, &x)| out[i * kq + q] = pair(x, 0.0)),
                    _ => r0.iter().zip(r1).enumerate().for_each(|(i, (&x, &y))| out[i * kq + q] = pair(x, y)),
                }
            }
        }
        out[m * kq..].fill(0);
    }

    /// `out[i · kq + at + q] = pair(src[2q][i], src[2q + 1][i])` for q below `pairs` (a multiple
    /// of 16) and every i: per output row, two gathers of 16 down the source's columns.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `src` has at least `2 · pairs` rows, its columns contiguous.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather_pairs(src: &Mat<f32>, pairs: usize, out: &mut [u32], kq: usize, at: usize) {
        use std::arch::x86_64::*;
        let m = src.cols;
        let step = 2 * src.row_stride as i32;
        let index = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(step),
        );
        let (round, low, high) =
            (_mm512_set1_epi32(0x7fff), _mm512_set1_epi32(1), _mm512_set1_epi32(0xffff_0000u32 as i32));
        assert!(out.len() >= m * kq && at + pairs <= kq, "invariant: the output holds every row");
        for q0 in (0..pairs).step_by(16) {
            // SAFETY (caller): rows 2·q0 … 2·q0 + 31 exist; each gather reads column i of 16 of them.
            unsafe {
                let even = src.ptr.offset(2 * q0 as isize * src.row_stride);
                let odd = even.offset(src.row_stride);
                for i in 0..m {
                    let x = _mm512_i32gather_epi32::<4>(index, even.add(i) as *const i32);
                    let y = _mm512_i32gather_epi32::<4>(index, odd.add(i) as *const i32);
                    // Round to nearest even, as `pair` does: + 0x7fff + bit 16.
                    let rx =
                        _mm512_add_epi32(x, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32::<16>(x), low)));
                    let ry =
                        _mm512_add_epi32(y, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32::<16>(y), low)));
                    let pairs = _mm512_or_si512(_mm512_and_si512(ry, high), _mm512_srli_epi32::<16>(rx));
                    _mm512_storeu_si512(out.as_mut_ptr().add(i * kq + at + q0) as *mut __m512i, pairs);
                }
            }
        }
    }

    /// B (k × n) as pairs of rows interleaved: row q holds (B[2q][j], B[2q+1][j]) for each column
    /// j, `round_up(n, 16)` of them, `round_up(k, 32) / 2` rows, zero-padded. Returns the padded
    /// row length.
    #[inline(always)]
    pub(super) fn pack_b(b: &Mat<f32>, out: &mut Vec<u32>) -> usize {
        let (kq, np) = (round_up(b.rows, TILE_DEPTH) / 2, round_up(b.cols, TILE_ROWS));
        out.resize(out.len().max(kq * np), 0);
        pack_b_rows(b, &mut out[..kq * np], np);
        np
    }

    /// [`pack_a`] compiled for AVX-512 (every AMX CPU has it), so that its loops vectorise.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma"))]
    pub(super) unsafe fn pack_a_avx512(a: &Mat<f32>, out: &mut Vec<u32>) -> usize {
        // SAFETY (caller): AVX-512.
        unsafe { pack_a(a, out) }
    }

    /// [`pack_b`] compiled for AVX-512; see [`pack_a_avx512`].
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma"))]
    pub(super) unsafe fn pack_b_avx512(b: &Mat<f32>, out: &mut Vec<u32>) -> usize {
        pack_b(b, out)
    }

    /// [`pack_b_rows`] compiled for AVX-512; see [`pack_a_avx512`].
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma"))]
    pub(super) unsafe fn pack_b_rows_avx512(b: &Mat<f32>, out: &mut [u32], np: usize) {
        pack_b_rows(b, out, np)
    }

    /// B packed into `out` (rows of `np` pairs; as many rows as `out` holds, zero past B).
    #[inline(always)]
    pub(super) fn pack_b_rows(b: &Mat<f32>, out: &mut [u32], np: usize) {
        let (k, n) = (b.rows, b.cols);
        let kq = out.len() / np;
        assert!(np >= n && 2 * kq >= k, "invariant: B fits");
        if b.row_stride == 1 && b.col_stride != 1 {
            // A transposed view (attention's keys, Kᵀ): column j of B is a contiguous source
            // row; read it once and deal its pairs out to the packed rows.
            let src = b.t();
            out.fill(0);
            for j in 0..n {
                // SAFETY: j < n = src.rows, columns of the transposed view contiguous.
                let col = unsafe { row(&src, j) };
                let (pairs, tail) = col.split_at(k - k % 2);
                for (q, p) in pairs.chunks_exact(2).enumerate() {
                    out[q * np + j] = pair(p[0], p[1]);
                }
                if let Some(&x) = tail.first() {
                    out[k / 2 * np + j] = pair(x, 0.0);
                }
            }
            return;
        }
        for q in 0..kq {
            let dst = &mut out[q * np..(q + 1) * np];
            dst[n..].fill(0);
            let (k0, k1) = (2 * q, 2 * q + 1);
            if k0 >= k {
                dst.fill(0);
            } else if b.col_stride == 1 {
                // SAFETY: rows below k, columns contiguous.
                let r0 = unsafe { row(b, k0) };
                if k1 < k {
                    let r1 = unsafe { row(b, k1) };
                    dst.iter_mut().zip(r0.iter().zip(r1)).for_each(|(o, (&x, &y))| *o = pair(x, y));
                } else {
                    dst.iter_mut().zip(r0).for_each(|(o, &x)| *o = pair(x, 0.0));
                }
            } else {
                // Neither rows nor columns contiguous: element by element.
                for (j, o) in dst[..n].iter_mut().enumerate() {
                    // SAFETY: indices inside the view.
                    *o = unsafe { pair(b.at(k0, j), if k1 < k { b.at(k1, j) } else { 0.0 }) };
                }
            }
        }
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    mod imp {
        use std::arch::asm;
        use std::cell::RefCell;

        use super::super::Mat;
        use super::{
            TILE_DEPTH, TILE_ROWS, pack_a_avx512, pack_a_rows, pack_b_avx512, pack_b_rows, pack_b_rows_avx512, round_up,
        };

        /// AMX-TILE and AMX-BF16 in CPUID, then the kernel's permission for the tile data.
        pub fn enable() -> bool {
            // CPUID leaf 7 (asked only where the CPU reports it): EDX bit 24 AMX-TILE, 22 AMX-BF16.
            let has = std::arch::x86_64::__cpuid(0).eax >= 7 && {
                let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
                edx & (1 << 24) != 0 && edx & (1 << 22) != 0
            };
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl with these arguments only changes this process's permissions.
            has && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
        }

        /// Depth tiles (of 32) summed into a C block before moving to the next block.
        const DEPTH_CHUNK: usize = 64;

        /// The tile configuration: palette 1, tiles 0–7 all 16 rows × 64 bytes.
        #[repr(C, align(64))]
        struct TileConfig {
            palette: u8,
            start_row: u8,
            reserved: [u8; 14],
            bytes_per_row: [u16; 16],
            rows: [u8; 16],
        }

        const CONFIG: TileConfig = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
            rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
        };

        thread_local! {
            static PACKED: RefCell<Packed> = const {
                RefCell::new(Packed { a: Vec::new(), b: Vec::new(), a_view: None })
            };
        }

        macro_rules! tile_load {
            ($t:literal, $ptr:expr, $stride:expr) => {
                asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride,
                     options(nostack, readonly))
            };
        }
        macro_rules! tile_store {
            ($t:literal, $ptr:expr, $stride:expr) => {
                asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $ptr, s = in(reg) $stride,
                     options(nostack))
            };
        }
        macro_rules! tile_dot {
            ($c:literal, $a:literal, $b:literal) => {
                asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
            };
        }

        /// Where C tile `t` (0–3) is loaded from and stored to: `dst` itself when the tile lies
        /// inside it, else a scratch tile holding the part that does.
        struct CTile {
            ptr: *mut f32,
            stride: usize,
            /// (row, column, rows, columns) of `dst` when the scratch is used.
            partial: Option<(usize, usize, usize, usize)>,
        }

        unsafe fn load_c(t: usize, c: &CTile) {
            // SAFETY (caller): `c.ptr` holds 16 rows of 16 f32 at `c.stride` bytes.
            unsafe {
                match t {
                    0 => tile_load!(0, c.ptr, c.stride),
                    1 => tile_load!(1, c.ptr, c.stride),
                    2 => tile_load!(2, c.ptr, c.stride),
                    _ => tile_load!(3, c.ptr, c.stride),
                }
            }
        }

        unsafe fn zero_c(t: usize) {
            // SAFETY (caller): the tile configuration is loaded.
            unsafe {
                match t {
                    0 => asm!("tilezero tmm0", options(nostack, nomem)),
                    1 => asm!("tilezero tmm1", options(nostack, nomem)),
                    2 => asm!("tilezero tmm2", options(nostack, nomem)),
                    _ => asm!("tilezero tmm3", options(nostack, nomem)),
                }
            }
        }

        unsafe fn store_c(t: usize, c: &CTile) {
            // SAFETY (caller): `c.ptr` holds 16 rows of 16 f32 at `c.stride` bytes.
            unsafe {
                match t {
                    0 => tile_store!(0, c.ptr, c.stride),
                    1 => tile_store!(1, c.ptr, c.stride),
                    2 => tile_store!(2, c.ptr, c.stride),
                    _ => tile_store!(3, c.ptr, c.stride),
                }
            }
        }

        /// The packed operands of this thread's last product, and which view A was.
        struct Packed {
            a: Vec<u32>,
            b: Vec<u32>,
            /// (pointer, rows, columns, row stride, column stride, pairs per row).
            a_view: Option<(usize, usize, usize, isize, isize, usize)>,
        }

        pub fn gemm_acc(dst: &mut [f32], a: Mat<f32>, b: Mat<f32>, again: bool) {
            PACKED.with_borrow_mut(|packed| {
                // SAFETY: AMX was enabled (the caller checked `available`), so the CPU has
                // AVX-512; the packed operands hold whole tiles for every index the loops reach
                // (a reused A has at least this product's rows and depth, and B's padding rows
                // are zero, so A's entries past this depth are multiplied by zeros), and C tiles
                // outside `dst` go through the scratch tiles.
                unsafe {
                    let kq = match packed.a_view {
                        Some((ptr, rows, cols, rs, cs, kq))
                            if again
                                && ptr == a.ptr as usize
                                && (rs, cs) == (a.row_stride, a.col_stride)
                                && a.rows <= rows
                                && a.cols <= cols =>
                        {
                            kq
                        }
                        _ => {
                            assert!(!again, "invariant: acc_again follows a product of the same A");
                            let kq = pack_a_avx512(&a, &mut packed.a);
                            packed.a_view = Some((a.ptr as usize, a.rows, a.cols, a.row_stride, a.col_stride, kq));
                            kq
                        }
                    };
                    let np = pack_b_avx512(&b, &mut packed.b);
                    let term = [(packed.a.as_ptr(), packed.b.as_ptr())];
                    run(dst, a.rows, b.cols, &term, kq, a.cols.div_ceil(TILE_DEPTH), np, false)
                }
            })
        }

        /// See [`super::gemm_acc_prepared`]; `b` holds rows of `np` pairs, at least
        /// `round_up(a.cols, 32) / 2` of them.
        pub fn gemm_acc_prepared(dst: &mut [f32], a: Mat<f32>, b: &[u32], np: usize, n: usize, overwrite: bool) {
            let kt = a.cols.div_ceil(TILE_DEPTH);
            assert!(b.len() >= kt * TILE_DEPTH / 2 * np && n <= np, "invariant: B holds every tile the loop reads");
            PACKED.with_borrow_mut(|packed| {
                packed.a_view = None;
                // SAFETY: as in `gemm_acc`: A is packed here with zeros past its depth (B's rows
                // there are finite, by `prepare`'s contract), B holds kt tiles of depth (checked)
                // and `np ≥ round_up(n, 16)` columns.
                unsafe {
                    let kq = pack_a_avx512(&a, &mut packed.a);
                    run(dst, a.rows, n, &[(packed.a.as_ptr(), b.as_ptr())], kq, kt, np, overwrite)
                }
            })
        }

        /// See [`super::conv_acc`]: `x` is packed once, with zero rows before and after it as far
        /// as the taps reach, and each tap's A tiles are the same packed rows moved by its
        /// offset; every C tile is loaded (or, with `overwrite`, zeroed) and stored once for all
        /// the taps.
        pub fn conv_acc(dst: &mut [f32], x: Mat<f32>, taps: &[(isize, Mat<f32>)], overwrite: bool) {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn pack(x: &Mat<f32>, taps: &[(isize, Mat<f32>)], packed: &mut Packed, front: usize, back: usize) {
                let (kq, np) = (round_up(x.cols, TILE_DEPTH) / 2, round_up(taps[0].1.cols, TILE_ROWS));
                let rows = front + round_up(x.rows, TILE_ROWS) + back;
                packed.a.resize(packed.a.len().max(rows * kq), 0);
                packed.a[..front * kq].fill(0);
                // SAFETY: compiled for, and run on, a CPU with AVX-512.
                unsafe { pack_a_rows(x, &mut packed.a[front * kq..rows * kq], kq) };
                packed.b.resize(packed.b.len().max(taps.len() * kq * np), 0);
                for (i, (_, w)) in taps.iter().enumerate() {
                    pack_b_rows(w, &mut packed.b[i * kq * np..(i + 1) * kq * np], np);
                }
            }
            let front = taps.iter().map(|&(o, _)| (-o).max(0) as usize).max().unwrap_or(0);
            let back = taps.iter().map(|&(o, _)| o.max(0) as usize).max().unwrap_or(0);
            let (m, n, k) = (x.rows, taps[0].1.cols, x.cols);
            let (kq, np) = (round_up(k, TILE_DEPTH) / 2, round_up(n, TILE_ROWS));
            PACKED.with_borrow_mut(|packed| {
                packed.a_view = None;
                // SAFETY: as in `gemm_acc`; a tap's A tiles start `front + o ≥ 0` rows into the
                // packed x and end at most `front + o + round_up(m, 16) ≤ front + back +
                // round_up(m, 16)` rows in, all packed (zeros outside x).
                unsafe {
                    pack(&x, taps, packed, front, back);
                    let mut terms = [(std::ptr::null(), std::ptr::null()); 16];
                    for (i, &(o, _)) in taps.iter().enumerate() {
                        let a_row = (front as isize + o) as usize;
                        terms[i] = (packed.a.as_ptr().add(a_row * kq), packed.b.as_ptr().add(i * kq * np));
                    }
                    run(dst, m, n, &terms[..taps.len()], kq, k.div_ceil(TILE_DEPTH), np, overwrite)
                }
            })
        }

        /// See [`super::conv_weight_acc`]. `dy` is packed once (B: its rows in pairs), and `xᵀ`
        /// once per parity of the offsets (A: rows of channels, pairs of x rows along the depth;
        /// a 1×1 convolution's one offset needs one copy, a wider kernel's both), with zero rows
        /// around x as far as the taps reach: tap k's A then starts `(o_k + front − phase) / 2`
        /// pairs into its copy, and the rows of x outside the sequence are zeros there.
        pub fn conv_weight_acc(dst: &mut [f32], x: Mat<f32>, dy: Mat<f32>, offsets: &[isize]) {
            let (r, c, n) = (x.rows, x.cols, dy.cols);
            let taps: Vec<(usize, isize)> =
                offsets.iter().copied().enumerate().filter(|&(_, o)| o.unsigned_abs() < r).collect();
            if taps.is_empty() {
                return;
            }
            // An even margin, so that an offset's parity is its copy's.
            let front = round_up(taps.iter().map(|&(_, o)| (-o).max(0) as usize).max().unwrap_or(0), 2);
            let (kt, np, mp) = (r.div_ceil(TILE_DEPTH), round_up(n, TILE_ROWS), round_up(c, TILE_ROWS));
            let kqb = kt * TILE_DEPTH / 2;
            let start = |o: isize| ((o + front as isize) as usize) / 2; // the pair tap o starts at
            let kq = taps.iter().map(|&(_, o)| start(o)).max().unwrap_or(0) + kqb;
            PACKED.with_borrow_mut(|packed| {
                packed.a_view = None;
                packed.b.resize(packed.b.len().max(kqb * np), 0);
                // SAFETY: AVX-512 (every AMX CPU has it).
                unsafe { pack_b_rows_avx512(&dy, &mut packed.b[..kqb * np], np) };
                packed.a.resize(packed.a.len().max(2 * mp * kq), 0);
                let (even, odd) = packed.a[..2 * mp * kq].split_at_mut(mp * kq);
                for (phase, out) in [even, odd].into_iter().enumerate() {
                    if !taps.iter().any(|&(_, o)| o.rem_euclid(2) as usize == phase) {
                        continue;
                    }
                    // Pair q holds x rows 2q + phase − front and the next.
                    // SAFETY: AVX-512 (every AMX CPU has it).
                    unsafe { pack_transposed(&x, phase as isize - front as isize, out, kq) };
                }
                for (k, o) in taps {
                    let phase = o.rem_euclid(2) as usize;
                    let a = packed.a.as_ptr().wrapping_add(phase * mp * kq + start(o - phase as isize));
                    // SAFETY: as in `gemm_acc`: tap k's A rows hold `kq − start ≥ kt · 16` pairs
                    // (zeros outside x), B's rows past dy are zero, and dst holds every tap's
                    // C × N block.
                    unsafe {
                        run(&mut dst[k * c * n..(k + 1) * c * n], c, n, &[(a, packed.b.as_ptr())], kq, kt, np, false)
                    };
                }
            })
        }

        /// `out` (rows of `kq` pairs, one per channel of `x (R × C)`, then zero rows to a whole
        /// tile): pair q of row ch holds `(x[2q + first][ch], x[2q + 1 + first][ch])`, rows of x
        /// outside it zero. Blocks of 16 pairs inside x are gathered (AVX-512), the rest copied
        /// one by one.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn pack_transposed(x: &Mat<f32>, first: isize, out: &mut [u32], kq: usize) {
            let (r, c) = (x.rows as isize, x.cols);
            // Pairs q_lo.. whose rows both lie in x, the first 16·blocks of them gathered.
            let q_lo = ((-first).max(0) as usize).div_ceil(2);
            let inside = ((r - first).max(0) / 2).min(kq as isize) as usize;
            let gathered = inside.saturating_sub(q_lo) / 16 * 16;
            // Zeros wherever the gather below does not write (clearing it all first was a
            // tenth of this function's time).
            for (ch, row) in out.chunks_exact_mut(kq).enumerate() {
                if ch < c && gathered > 0 {
                    row[..q_lo].fill(0);
                    row[q_lo + gathered..].fill(0);
                } else {
                    row.fill(0);
                }
            }
            if gathered > 0 {
                let src = x.row_range((2 * q_lo as isize + first) as usize, 2 * gathered);
                // SAFETY: AVX-512F (compiled for it; every AMX CPU has it); `src` holds 2·gathered
                // rows with contiguous columns, and pairs q_lo + gathered ≤ kq.
                unsafe { super::gather_pairs(&src, gathered, out, kq, q_lo) };
            }
            let zeros = vec![0f32; c];
            // SAFETY: rows inside the view (checked), whose columns are contiguous.
            let row = |i: isize| if (0..r).contains(&i) { unsafe { super::row(x, i as usize) } } else { &zeros[..] };
            for q in (0..kq).filter(|q| !(q_lo..q_lo + gathered).contains(q)) {
                let i = 2 * q as isize + first;
                if i + 1 < 0 || i >= r {
                    continue;
                }
                let (lo, hi) = (row(i), row(i + 1));
                for ch in 0..c {
                    out[ch * kq + q] = super::pair(lo[ch], hi[ch]);
                }
            }
        }

        /// `dst (m × n) += Σ A B` over `terms` (pointers to packed A's first row and to packed
        /// B; A rows of `kq` pairs, B rows of `np`, `kt` tiles deep), in blocks of 2 × 2 C tiles
        /// (tiles 0–3), with A tiles in 4–5 and B tiles in 6–7. The depth is taken in chunks
        /// of [`DEPTH_CHUNK`] tiles, and within a chunk every block of A rows meets every block
        /// of B columns before the next: the chunk's A rows stay in L1 while the B columns
        /// (weights, or a chunk of a gradient) stay in L2, rather than A being streamed from
        /// memory once per pair of B columns. With `overwrite`, `dst = Σ A B`: the first chunk's
        /// C tiles start from zero instead of from `dst`, which need not be cleared.
        #[allow(clippy::too_many_arguments)]
        unsafe fn run(
            dst: &mut [f32],
            m: usize,
            n: usize,
            terms: &[(*const u32, *const u32)],
            kq: usize,
            kt: usize,
            np: usize,
            overwrite: bool,
        ) {
            let (mt, nt) = (m.div_ceil(TILE_ROWS), n.div_ceil(TILE_ROWS));
            let (a_stride, b_stride, d_stride) = (kq * 4, np * 4, n * 4);
            let mut scratch = [[0f32; 256]; 4];
            // SAFETY: see `gemm_acc`.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
                for (ib, jb, k0) in (0..kt).step_by(DEPTH_CHUNK).flat_map(|k0| {
                    (0..mt).step_by(2).flat_map(move |ib| (0..nt).step_by(2).map(move |jb| (ib, jb, k0)))
                }) {
                    {
                        let fresh = overwrite && k0 == 0;
                        let (two_i, two_j) = (ib + 1 < mt, jb + 1 < nt);
                        let mut tiles: [Option<CTile>; 4] = [None, None, None, None];
                        for (t, (scr, slot)) in scratch.iter_mut().zip(tiles.iter_mut()).enumerate() {
                            let (ti, tj) = (ib + t / 2, jb + t % 2);
                            if ti >= mt || tj >= nt {
                                continue;
                            }
                            let (r0, c0) = (ti * TILE_ROWS, tj * TILE_ROWS);
                            let (rows, cols) = ((m - r0).min(TILE_ROWS), (n - c0).min(TILE_ROWS));
                            let tile = if rows == TILE_ROWS && cols == TILE_ROWS {
                                CTile { ptr: dst.as_mut_ptr().add(r0 * n + c0), stride: d_stride, partial: None }
                            } else {
                                scr.fill(0.0);
                                if !fresh {
                                    for r in 0..rows {
                                        scr[r * 16..r * 16 + cols].copy_from_slice(&dst[(r0 + r) * n + c0..][..cols]);
                                    }
                                }
                                CTile { ptr: scr.as_mut_ptr(), stride: 64, partial: Some((r0, c0, rows, cols)) }
                            };
                            if fresh {
                                zero_c(t)
                            } else {
                                load_c(t, &tile)
                            }
                            *slot = Some(tile);
                        }
                        let depth = k0..(k0 + DEPTH_CHUNK).min(kt);
                        for (kb, &(pa, pb)) in depth.flat_map(|kb| terms.iter().map(move |t| (kb, t))) {
                            let a0 = pa.add(ib * TILE_ROWS * kq + kb * TILE_DEPTH / 2);
                            let b0 = pb.add(kb * TILE_DEPTH / 2 * np + jb * TILE_ROWS);
                            tile_load!(4, a0, a_stride);
                            tile_load!(6, b0, b_stride);
                            tile_dot!(0, 4, 6);
                            if two_j {
                                tile_load!(7, b0.add(TILE_ROWS), b_stride);
                                tile_dot!(1, 4, 7);
                            }
                            if two_i {
                                tile_load!(5, a0.add(TILE_ROWS * kq), a_stride);
                                tile_dot!(2, 5, 6);
                                if two_j {
                                    tile_dot!(3, 5, 7);
                                }
                            }
                        }
                        for (t, slot) in tiles.iter().enumerate() {
                            let Some(tile) = slot else { continue };
                            store_c(t, tile);
                            if let Some((r0, c0, rows, cols)) = tile.partial {
                                let scr = &scratch[t];
                                for r in 0..rows {
                                    dst[(r0 + r) * n + c0..][..cols].copy_from_slice(&scr[r * 16..r * 16 + cols]);
                                }
                            }
                        }
                    }
                }
                asm!("tilerelease", options(nostack, nomem));
            }
        }
    }

    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    mod imp {
        use super::super::Mat;

        pub fn enable() -> bool {
            false
        }

        pub fn gemm_acc(_: &mut [f32], _: Mat<f32>, _: Mat<f32>, _: bool) {
            unreachable!("invariant: AMX is never available here")
        }

        pub fn gemm_acc_prepared(_: &mut [f32], _: Mat<f32>, _: &[u32], _: usize, _: usize, _: bool) {
            unreachable!("invariant: AMX is never available here")
        }

        pub fn conv_acc(_: &mut [f32], _: Mat<f32>, _: &[(isize, Mat<f32>)], _: bool) {
            unreachable!("invariant: AMX is never available here")
        }

        pub fn conv_weight_acc(_: &mut [f32], _: Mat<f32>, _: Mat<f32>, _: &[isize]) {
            unreachable!("invariant: AMX is never available here")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `dst += a × b` in f64 from the bf16-rounded operands: what the tile unit must produce,
    /// up to the order of f32 sums.
    fn reference(dst: &mut [f32], a: Mat<f32>, b: Mat<f32>) {
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = dst[i * b.cols + j] as f64;
                for k in 0..a.cols {
                    // SAFETY: indices inside the views.
                    let (x, y) = unsafe { (a.at(i, k), b.at(k, j)) };
                    s += from_bf16(to_bf16(x)) as f64 * from_bf16(to_bf16(y)) as f64;
                }
                dst[i * b.cols + j] = s as f32;
            }
        }
    }

    /// The convolution form: taps before and after, reaching past the ends, ragged sizes.
    #[test]
    fn tile_convolutions_match_the_reference() {
        if !amx::available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        for &(m, k, n, ref offsets) in
            &[(50, 32, 64, vec![-4isize, 0]), (37, 45, 20, vec![-70, -1, 0, 3]), (100, 64, 32, vec![0, 8, 99, 150])]
        {
            let xv = filled(m * k, 4);
            let x = Mat::new(&xv, 0, m, k);
            let ws: Vec<Vec<f32>> = (0..offsets.len()).map(|i| filled(k * n, 5 + i as u32)).collect();
            let taps: Vec<(isize, Mat<f32>)> =
                offsets.iter().zip(&ws).map(|(&o, w)| (o, Mat::new(w, 0, k, n))).collect();
            // `+=` onto a start, and `=` over garbage (which must not show through).
            for overwrite in [false, true] {
                let start = filled(m * n, 9);
                let (mut got, mut want) = (start.clone(), start);
                if overwrite {
                    got.fill(f32::NAN);
                    want.fill(0.0);
                    Bf16::conv_set(&mut got, 0, x, &taps);
                } else {
                    Bf16::conv_acc(&mut got, 0, x, &taps);
                }
                for &(o, w) in &taps {
                    for t in 0..m {
                        let Some(src) = t.checked_add_signed(o).filter(|&s| s < m) else { continue };
                        reference(&mut want[t * n..(t + 1) * n], x.row_range(src, 1), w);
                    }
                }
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{m}×{k}×{n} {offsets:?} overwrite {overwrite}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// The weight gradients of a convolution: taps of both parities or of one, before and
    /// after, reaching past the ends, ragged sizes, offset destinations.
    #[test]
    fn tile_weight_gradients_match_the_reference() {
        if !amx::available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        let cases = [
            (50, 32, 64, vec![-4isize, 0]),
            (37, 45, 20, vec![-70, -31, -1, 0, 3, 36]),
            (100, 64, 32, vec![0, 8, 99, 150, -33, -2, 1]),
            (2100, 16, 20, vec![-1, 0, 2]), // deeper than one chunk of the tile loop
            (64, 48, 32, vec![0]),          // a 1×1 convolution: only the even copy is packed
            (45, 24, 40, vec![-3, 5]),      // odd offsets only
        ];
        // Forward, then back: each case also meets the packing buffers the others left.
        for &(r, c, n, ref offsets) in cases.iter().chain(cases.iter().rev()) {
            let (xv, dyv) = (filled(r * c, 4), filled(r * n, 6));
            let (x, dy) = (Mat::new(&xv, 0, r, c), Mat::new(&dyv, 0, r, n));
            let at = 7;
            let start = filled(at + offsets.len() * c * n, 9);
            let (mut got, mut want) = (start.clone(), start);
            Bf16::conv_weight_acc(&mut got, at, x, dy, offsets);
            for (k, &o) in offsets.iter().enumerate() {
                for t in 0..r {
                    let Some(src) = t.checked_add_signed(o).filter(|&s| s < r) else { continue };
                    reference(
                        &mut want[at + k * c * n..at + (k + 1) * c * n],
                        x.row_range(src, 1).t(),
                        dy.row_range(t, 1),
                    );
                }
            }
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{r}×{c}×{n} {offsets:?}: {g} vs {w}");
            }
        }
    }

    /// A prepared B, plain and transposed, used by products with its leading rows and columns
    /// (ragged against the tiles), equals the product with that corner of B, added to the
    /// destination or written over it.
    #[test]
    fn prepared_corners_match_the_reference() {
        if !amx::available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        // (B's rows, B's columns, corners as (A's rows, depth, columns)); the second B is
        // deeper than one chunk of the tile loop.
        type Corners = &'static [(usize, usize, usize)];
        let shapes: [(usize, usize, Corners); 2] = [
            (70, 45, &[(1, 1, 1), (16, 32, 16), (37, 45, 20), (64, 70, 45), (5, 33, 17)]),
            (2100, 20, &[(37, 2100, 20), (20, 2081, 3)]),
        ];
        for (tb, &(k, n, corners)) in [false, true].into_iter().flat_map(|tb| shapes.iter().map(move |s| (tb, s))) {
            let bv = filled(k * n, 2);
            let b = if tb { Mat::new(&bv, 0, n, k).t() } else { Mat::new(&bv, 0, k, n) };
            let prepared = Bf16::prepare(b);
            for &(m, depth, cols) in corners {
                let av = filled(m * depth, 1);
                let a = Mat::new(&av, 0, m, depth);
                let start = filled(m * cols, 3);
                let (mut got, mut want) = (start.clone(), start);
                Bf16::acc_prepared(&mut got, 0, a, &prepared, cols);
                reference(&mut want, a, b.row_range(0, depth).col_range(0, cols));
                // Written over (`=`): whatever the destination held is gone.
                let mut set = filled(m * cols, 8);
                Bf16::set_prepared(&mut set, 0, a, &prepared, cols);
                let mut from_zero = vec![0.0; m * cols];
                reference(&mut from_zero, a, b.row_range(0, depth).col_range(0, cols));
                for ((g, w), (s, z)) in got.iter().zip(&want).zip(set.iter().zip(&from_zero)) {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}×{depth}×{cols} ({tb}): {g} vs {w}");
                    assert!((s - z).abs() <= 1e-4 * (1.0 + z.abs()), "{m}×{depth}×{cols} ({tb}), set: {s} vs {z}");
                }
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0); // a tie: to the even 1.0
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0); // a tie: up to even
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    /// Every shape class the WaveNet op uses, with ragged edges and transposed operands:
    /// A (m × k) by B (k × n), into a destination that already holds values.
    #[test]
    fn tile_products_match_the_reference() {
        if !amx::available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        for &(m, k, n) in &[(1, 1, 1), (16, 32, 16), (37, 45, 70), (200, 32, 64), (32, 333, 64), (5, 128, 256)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (av, bv) = (filled(m * k, 1), filled(k * n, 2));
                let a = if ta { Mat::new(&av, 0, k, m).t() } else { Mat::new(&av, 0, m, k) };
                let b = if tb { Mat::new(&bv, 0, n, k).t() } else { Mat::new(&bv, 0, k, n) };
                let start = filled(m * n, 3);
                let (mut got, mut want) = (start.clone(), start);
                Bf16::acc(&mut got, 0, a, b);
                reference(&mut want, a, b);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}×{k}×{n} ({ta}, {tb}): {g} vs {w}");
                }
            }
        }
    }
}
