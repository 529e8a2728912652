//! Index math mapping byte ranges of the flat, C-order file onto chunks of the Zarr array.
//!
//! Everything here is pure arithmetic so it can be property-tested against a naive model; the
//! read path calls [`ChunkLayout::pieces`] on every FUSE read, so it is written to do work
//! proportional to the number of contiguous runs, never to the number of elements.
//!
//! Two internal simplifications keep the walk short:
//!
//! * The last dimension is measured in bytes (`shape[-1] * itemsize`), so the array becomes a
//!   byte array and reads that start or end mid-element need no special case.
//! * Adjacent dimensions are collapsed when the chunk spans the whole array along the inner one
//!   (`chunk[i + 1] == shape[i + 1]`): the pair is then contiguous both in the file and in the
//!   chunk buffer, so it behaves as a single dimension. Without this, an array shaped
//!   `[n, 1]` with chunks `[1024, 1]` would yield one run per element before merging.

use std::collections::HashSet;

/// Geometry of one array: shape, chunk shape, element size. Built once at mount time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLayout {
    shape: Vec<u64>,
    chunk_shape: Vec<u64>,
    itemsize: u64,
    grid_shape: Vec<u64>,
    file_size: u64,
    chunk_bytes: u64,
    /// The collapsed byte-level view used by the walks. Empty when `file_size == 0`, since
    /// there is nothing to walk and zero extents would make the collapse rule meaningless.
    dims: Vec<Dim>,
}

/// One dimension of the collapsed byte-level view.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Dim {
    /// Extent of the array along this dimension (bytes for the innermost one).
    extent: u64,
    /// Extent of a chunk along this dimension.
    chunk: u64,
    /// Distance between consecutive positions along this dimension in the flat file.
    file_stride: u64,
    /// Distance between consecutive positions along this dimension in a decoded chunk.
    chunk_stride: u64,
    /// Which original dimension receives this dimension's grid index; the original dimensions
    /// folded into it all have a grid of one chunk, so their index is always 0. `None` only for
    /// the stand-in dimension of a 0-d array, whose chunk index is empty.
    orig: Option<usize>,
}

/// One contiguous copy: `len` bytes from the decoded chunk `chunk` (grid indices) starting at
/// byte `chunk_offset` of that chunk's buffer, into the output at byte `out_offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub chunk: Vec<u64>,
    pub chunk_offset: u64,
    pub out_offset: u64,
    pub len: u64,
}

fn checked_product(values: &[u64], itemsize: u64) -> Option<u64> {
    values.iter().try_fold(itemsize, |acc, &v| acc.checked_mul(v))
}

impl ChunkLayout {
    /// Fails if the ranks differ, a chunk dimension or `itemsize` is 0, or the file or a chunk
    /// would be larger than `u64::MAX` bytes. Checking sizes here is what lets every other
    /// method use plain arithmetic: all offsets are bounded by `file_size` or `chunk_bytes`.
    pub fn new(shape: &[u64], chunk_shape: &[u64], itemsize: u64) -> Result<Self, String> {
        if shape.len() != chunk_shape.len() {
            return Err(format!("shape {shape:?} and chunk shape {chunk_shape:?} have different ranks"));
        }
        if chunk_shape.contains(&0) {
            return Err(format!("chunk shape {chunk_shape:?} has a zero dimension"));
        }
        if itemsize == 0 {
            return Err("itemsize is 0".to_string());
        }
        let file_size = checked_product(shape, itemsize)
            .ok_or_else(|| format!("array {shape:?} x {itemsize} bytes overflows u64"))?;
        let chunk_bytes = checked_product(chunk_shape, itemsize)
            .ok_or_else(|| format!("chunk {chunk_shape:?} x {itemsize} bytes overflows u64"))?;
        // Ceiling division that cannot overflow even for extents near u64::MAX.
        let grid_shape = shape.iter().zip(chunk_shape).map(|(&s, &c)| s / c + u64::from(s % c != 0)).collect();

        let mut layout = ChunkLayout {
            shape: shape.to_vec(),
            chunk_shape: chunk_shape.to_vec(),
            itemsize,
            grid_shape,
            file_size,
            chunk_bytes,
            dims: Vec::new(),
        };
        if file_size > 0 {
            layout.dims = layout.collapsed_dims();
        }
        Ok(layout)
    }

    /// Builds the byte-level, collapsed view described in the module docs. Only called for
    /// non-empty arrays, so every extent is at least 1.
    fn collapsed_dims(&self) -> Vec<Dim> {
        let rank = self.shape.len();
        // A 0-d array is one element stored in one chunk: treat it as shape [1], chunk [1].
        let (extents, chunks, origs): (Vec<u64>, Vec<u64>, Vec<Option<usize>>) = if rank == 0 {
            (vec![self.itemsize], vec![self.itemsize], vec![None])
        } else {
            let mut e = self.shape.clone();
            let mut c = self.chunk_shape.clone();
            e[rank - 1] *= self.itemsize;
            c[rank - 1] *= self.itemsize;
            (e, c, (0..rank).map(Some).collect())
        };

        let mut dims: Vec<Dim> = Vec::with_capacity(extents.len());
        for ((extent, chunk), orig) in extents.into_iter().zip(chunks).zip(origs) {
            match dims.last_mut() {
                // The chunk covers this dimension entirely, so stepping along the outer
                // dimension moves by exactly `extent` in both the file and the chunk buffer.
                Some(outer) if chunk == extent => {
                    outer.extent *= extent;
                    outer.chunk *= chunk;
                }
                _ => dims.push(Dim { extent, chunk, file_stride: 0, chunk_stride: 0, orig }),
            }
        }
        let (mut file_stride, mut chunk_stride) = (1u64, 1u64);
        for d in dims.iter_mut().rev() {
            d.file_stride = file_stride;
            d.chunk_stride = chunk_stride;
            file_stride *= d.extent;
            chunk_stride *= d.chunk;
        }
        dims
    }

    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    pub fn chunk_shape(&self) -> &[u64] {
        &self.chunk_shape
    }

    pub fn itemsize(&self) -> u64 {
        self.itemsize
    }

    /// `product(shape) * itemsize`.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// `product(chunk_shape) * itemsize`: edge chunks are decoded at full size too, so this is
    /// the buffer size of every chunk.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// `ceil(shape / chunk_shape)` per dimension; empty for a 0-d array.
    pub fn grid_shape(&self) -> Vec<u64> {
        self.grid_shape.clone()
    }

    /// Number of chunks; 1 for a 0-d array, 0 if any dimension is 0. Cannot overflow because
    /// each grid extent is at most the corresponding array extent.
    pub fn chunk_count(&self) -> u64 {
        self.grid_shape.iter().product()
    }

    /// Linear (C-order) index of a chunk in the grid.
    ///
    /// # Panics
    /// If `chunk` has the wrong rank.
    pub fn chunk_linear(&self, chunk: &[u64]) -> u64 {
        assert_eq!(chunk.len(), self.grid_shape.len(), "chunk index rank");
        debug_assert!(chunk.iter().zip(&self.grid_shape).all(|(c, g)| c < g));
        chunk.iter().zip(&self.grid_shape).fold(0, |acc, (&c, &g)| acc * g + c)
    }

    /// Inverse of [`chunk_linear`](Self::chunk_linear).
    pub fn chunk_from_linear(&self, linear: u64) -> Vec<u64> {
        debug_assert!(linear < self.chunk_count());
        let mut out = vec![0; self.grid_shape.len()];
        let mut rest = linear;
        for (o, &g) in out.iter_mut().zip(&self.grid_shape).rev() {
            *o = rest % g;
            rest /= g;
        }
        out
    }

    /// Requested `[offset, offset + len)` clipped to the file; `None` if nothing remains.
    fn clip(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.file_size);
        (offset < end).then_some((offset, end))
    }

    /// The chunk index in original dimensions for a collapsed grid position.
    fn original_chunk(&self, grid: &[u64]) -> Vec<u64> {
        let mut out = vec![0; self.shape.len()];
        for (d, &g) in self.dims.iter().zip(grid) {
            if let Some(o) = d.orig {
                out[o] = g;
            }
        }
        out
    }

    /// Pieces covering bytes [offset, offset+len) of the flat file, clipped to file_size, in
    /// increasing out_offset order, adjacent pieces merged when both the source (same chunk,
    /// contiguous chunk_offset) and the destination are contiguous. Byte-granular: offset and
    /// len need not be multiples of itemsize (a read may start mid-element).
    ///
    /// `out_offset` is relative to `offset`, i.e. it indexes the caller's read buffer.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let Some((start, end)) = self.clip(offset, len) else {
            return Vec::new();
        };
        let n = self.dims.len();
        let inner = &self.dims[n - 1];
        // Position of the walk: coordinate `pos`, split into chunk index `grid` and offset
        // within the chunk `within`, kept in step by carrying instead of dividing per run.
        let mut pos = vec![0u64; n];
        let mut grid = vec![0u64; n];
        let mut within = vec![0u64; n];
        let mut rest = start;
        for (i, d) in self.dims.iter().enumerate() {
            pos[i] = rest / d.file_stride;
            rest %= d.file_stride;
            grid[i] = pos[i] / d.chunk;
            within[i] = pos[i] % d.chunk;
        }

        let mut out: Vec<Piece> = Vec::with_capacity(self.run_estimate(end - start));
        let mut at = start;
        loop {
            // A run stops at the end of the chunk row, the end of the array row, or the range.
            let run = (inner.chunk - within[n - 1]).min(inner.extent - pos[n - 1]).min(end - at);
            let chunk_offset: u64 = self.dims.iter().zip(&within).map(|(d, w)| w * d.chunk_stride).sum();
            let out_offset = at - start;
            // With collapsed dimensions consecutive runs are never mergeable (the next run is in
            // another chunk or past the padding), but merging keeps the contract independent of
            // that argument and costs only a comparison.
            let merge = out.last().is_some_and(|last| {
                last.chunk_offset + last.len == chunk_offset
                    && self.dims.iter().zip(&grid).all(|(d, g)| d.orig.is_none_or(|o| last.chunk[o] == *g))
            });
            if merge {
                out.last_mut().unwrap().len += run;
            } else {
                out.push(Piece { chunk: self.original_chunk(&grid), chunk_offset, out_offset, len: run });
            }

            at += run;
            if at == end {
                break;
            }
            pos[n - 1] += run;
            within[n - 1] += run;
            if within[n - 1] == inner.chunk {
                within[n - 1] = 0;
                grid[n - 1] += 1;
            }
            // Carry into outer dimensions. Cannot run off dimension 0: `at < end <= file_size`.
            let mut i = n - 1;
            while pos[i] == self.dims[i].extent {
                pos[i] = 0;
                within[i] = 0;
                grid[i] = 0;
                i -= 1;
                pos[i] += 1;
                within[i] += 1;
                if within[i] == self.dims[i].chunk {
                    within[i] = 0;
                    grid[i] += 1;
                }
            }
        }
        out
    }

    /// Upper bound on runs for a range of `len` bytes, to size the output once. Each run except
    /// the first and last spans a full chunk row or ends at an array row, so this is close.
    fn run_estimate(&self, len: u64) -> usize {
        let inner = &self.dims[self.dims.len() - 1];
        let step = inner.chunk.min(inner.extent).max(1);
        usize::try_from(len / step + 2).unwrap_or(usize::MAX).min(1 << 20)
    }

    /// The chunks (grid indices, in order of first appearance) that bytes [offset, offset+len)
    /// touch, without building pieces. Used for prefetch.
    ///
    /// Prefetch ranges can be much larger than reads, so instead of walking runs this splits
    /// the range into at most `2 * rank` boxes (partial rows at the start, whole slabs in the
    /// middle, partial rows at the end) and enumerates each box's chunks directly: the cost is
    /// proportional to the number of chunks touched, not to the bytes covered.
    pub fn chunks_touched(&self, offset: u64, len: u64) -> Vec<Vec<u64>> {
        let Some((start, end)) = self.clip(offset, len) else {
            return Vec::new();
        };
        let unravel = |mut rest: u64| -> Vec<u64> {
            self.dims
                .iter()
                .map(|d| {
                    let c = rest / d.file_stride;
                    rest %= d.file_stride;
                    c
                })
                .collect()
        };
        let first = unravel(start);
        let last = unravel(end - 1);
        let n = self.dims.len();
        let mut lo = vec![0; n];
        let mut hi = vec![0; n];
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        self.boxes(&first, &last, 0, &mut lo, &mut hi, &mut |lo, hi| self.box_chunks(lo, hi, &mut seen, &mut out));
        out
    }

    /// Splits the row-major range from coordinate `a` to `z` (inclusive; only dims `d..` are
    /// read, the outer ones are already fixed in `lo`/`hi`) into boxes, reported in file order.
    fn boxes(
        &self,
        a: &[u64],
        z: &[u64],
        d: usize,
        lo: &mut [u64],
        hi: &mut [u64],
        emit: &mut dyn FnMut(&[u64], &[u64]),
    ) {
        let n = self.dims.len();
        if d == n - 1 {
            lo[d] = a[d];
            hi[d] = z[d];
            return emit(lo, hi);
        }
        if a[d] == z[d] {
            lo[d] = a[d];
            hi[d] = a[d];
            return self.boxes(a, z, d + 1, lo, hi, emit);
        }
        let zeros = vec![0; n];
        let maxes: Vec<u64> = self.dims.iter().map(|d| d.extent - 1).collect();
        let head_whole = a[d + 1..] == zeros[d + 1..];
        let tail_whole = z[d + 1..] == maxes[d + 1..];
        let (mut mid_lo, mut mid_hi) = (a[d], z[d]);
        if !head_whole {
            lo[d] = a[d];
            hi[d] = a[d];
            self.boxes(a, &maxes, d + 1, lo, hi, emit);
            mid_lo += 1;
        }
        if !tail_whole {
            mid_hi -= 1;
        }
        if mid_lo <= mid_hi {
            lo[d] = mid_lo;
            hi[d] = mid_hi;
            lo[d + 1..].copy_from_slice(&zeros[d + 1..]);
            hi[d + 1..].copy_from_slice(&maxes[d + 1..]);
            emit(lo, hi);
        }
        if !tail_whole {
            lo[d] = z[d];
            hi[d] = z[d];
            self.boxes(&zeros, z, d + 1, lo, hi, emit);
        }
    }

    /// Appends the not-yet-seen chunks of the box `lo..=hi`. A row-major walk of a box meets
    /// chunks in C order of their grid indices, so plain odometer order is first-appearance
    /// order.
    fn box_chunks(&self, lo: &[u64], hi: &[u64], seen: &mut HashSet<u64>, out: &mut Vec<Vec<u64>>) {
        let glo: Vec<u64> = self.dims.iter().zip(lo).map(|(d, x)| x / d.chunk).collect();
        let ghi: Vec<u64> = self.dims.iter().zip(hi).map(|(d, x)| x / d.chunk).collect();
        let mut g = glo.clone();
        loop {
            let chunk = self.original_chunk(&g);
            if seen.insert(self.chunk_linear(&chunk)) {
                out.push(chunk);
            }
            // Odometer step; done when every dimension has wrapped.
            let mut i = g.len();
            loop {
                if i == 0 {
                    return;
                }
                i -= 1;
                if g[i] < ghi[i] {
                    g[i] += 1;
                    break;
                }
                g[i] = glo[i];
            }
        }
    }

    /// Bytes of decoded chunks needed to hold one "stripe": all chunks touched by one full row
    /// of chunks along dim 0 (i.e. product(grid_shape[1..]) * chunk_bytes). A row-major scan
    /// decodes each chunk once iff the cache holds at least this.
    ///
    /// For a 0-d array that is one chunk. Saturates at `u64::MAX` rather than overflowing
    /// (possible when chunks far exceed the array in several dimensions); no cache is that big,
    /// so the answer "more than you can have" is still the right one.
    pub fn stripe_bytes(&self) -> u64 {
        self.grid_shape.iter().skip(1).fold(self.chunk_bytes, |acc, &g| acc.saturating_mul(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout(shape: &[u64], chunk: &[u64], itemsize: u64) -> ChunkLayout {
        ChunkLayout::new(shape, chunk, itemsize).unwrap()
    }

    fn piece(chunk: &[u64], chunk_offset: u64, out_offset: u64, len: u64) -> Piece {
        Piece { chunk: chunk.to_vec(), chunk_offset, out_offset, len }
    }

    fn unravel(mut linear: u64, shape: &[u64]) -> Vec<u64> {
        let mut out = vec![0; shape.len()];
        for (o, &s) in out.iter_mut().zip(shape).rev() {
            *o = linear % s;
            linear /= s;
        }
        out
    }

    fn ravel(coords: &[u64], shape: &[u64]) -> u64 {
        coords.iter().zip(shape).fold(0, |acc, (&c, &s)| acc * s + c)
    }

    /// Byte-by-byte reference: for each file byte, which chunk (linear) and which byte of that
    /// chunk's buffer holds it.
    fn naive(l: &ChunkLayout, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len).min(l.file_size());
        let isz = l.itemsize();
        (offset..end.max(offset))
            .map(|p| {
                let coords = unravel(p / isz, l.shape());
                let g: Vec<u64> = coords.iter().zip(l.chunk_shape()).map(|(x, c)| x / c).collect();
                let w: Vec<u64> = coords.iter().zip(l.chunk_shape()).map(|(x, c)| x % c).collect();
                (l.chunk_linear(&g), ravel(&w, l.chunk_shape()) * isz + p % isz)
            })
            .collect()
    }

    /// Assembles the output from pieces, where each "byte" of a fake chunk buffer is the pair
    /// (chunk, position) so any misplaced byte is detectable.
    fn assemble(l: &ChunkLayout, pieces: &[Piece], out_len: u64) -> Vec<(u64, u64)> {
        let mut out = vec![(u64::MAX, u64::MAX); out_len as usize];
        for p in pieces {
            let lin = l.chunk_linear(&p.chunk);
            for j in 0..p.len {
                let slot = &mut out[(p.out_offset + j) as usize];
                assert_eq!(*slot, (u64::MAX, u64::MAX), "byte written twice");
                *slot = (lin, p.chunk_offset + j);
            }
        }
        out
    }

    fn check_all(l: &ChunkLayout, offset: u64, len: u64) {
        let expected = naive(l, offset, len);
        let ps = l.pieces(offset, len);
        assert_eq!(assemble(l, &ps, expected.len() as u64), expected);

        let isz = l.itemsize();
        for (i, p) in ps.iter().enumerate() {
            assert!(p.len > 0);
            assert!(p.chunk_offset + p.len <= l.chunk_bytes());
            // Every byte read lies inside the array, never in edge-chunk padding.
            for j in [0, p.len - 1] {
                let w = unravel((p.chunk_offset + j) / isz, l.chunk_shape());
                for ((g, w), (c, s)) in p.chunk.iter().zip(&w).zip(l.chunk_shape().iter().zip(l.shape())) {
                    assert!(g * c + w < *s, "padding read in {p:?}");
                }
            }
            if i > 0 {
                let q = &ps[i - 1];
                assert_eq!(q.out_offset + q.len, p.out_offset);
                assert!(!(q.chunk == p.chunk && q.chunk_offset + q.len == p.chunk_offset), "unmerged {q:?} {p:?}");
            }
        }

        let mut distinct: Vec<Vec<u64>> = Vec::new();
        for p in &ps {
            if !distinct.contains(&p.chunk) {
                distinct.push(p.chunk.clone());
            }
        }
        assert_eq!(l.chunks_touched(offset, len), distinct);
    }

    #[test]
    fn one_dim() {
        let l = layout(&[10], &[4], 2);
        assert_eq!(l.file_size(), 20);
        assert_eq!(l.chunk_bytes(), 8);
        assert_eq!(l.grid_shape(), vec![3]);
        assert_eq!(l.pieces(0, 100), vec![piece(&[0], 0, 0, 8), piece(&[1], 0, 8, 8), piece(&[2], 0, 16, 4)]);
        assert_eq!(l.pieces(6, 4), vec![piece(&[0], 6, 0, 2), piece(&[1], 0, 2, 2)]);
        assert_eq!(l.pieces(20, 5), vec![]);
        assert_eq!(l.pieces(u64::MAX, u64::MAX), vec![]);
        assert_eq!(l.chunks_touched(6, 4), vec![vec![0], vec![1]]);
        assert_eq!(l.stripe_bytes(), 8);
    }

    #[test]
    fn two_dim_edge_chunks() {
        // 3x5 array of u8 in 2x2 chunks: grid 2x3, right and bottom chunks padded.
        let l = layout(&[3, 5], &[2, 2], 1);
        assert_eq!(l.grid_shape(), vec![2, 3]);
        assert_eq!(l.chunk_count(), 6);
        assert_eq!(
            l.pieces(3, 9),
            vec![
                piece(&[0, 1], 1, 0, 1), // (0,3)
                piece(&[0, 2], 0, 1, 1), // (0,4); chunk col 2 is padded
                piece(&[0, 0], 2, 2, 2), // (1,0..2)
                piece(&[0, 1], 2, 4, 2), // (1,2..4)
                piece(&[0, 2], 2, 6, 1), // (1,4)
                piece(&[1, 0], 0, 7, 2), // (2,0..2)
            ]
        );
        assert_eq!(l.chunks_touched(3, 9), vec![vec![0, 1], vec![0, 2], vec![0, 0], vec![1, 0]]);
        assert_eq!(l.stripe_bytes(), 3 * 4);
        for off in 0..16 {
            for len in 0..17 {
                check_all(&l, off, len);
            }
        }
    }

    #[test]
    fn mid_element_start() {
        let l = layout(&[2, 3], &[2, 2], 4);
        // Byte 6 is the middle of element (0,1); the run ends at the chunk column boundary.
        assert_eq!(l.pieces(6, 8), vec![piece(&[0, 0], 6, 0, 2), piece(&[0, 1], 0, 2, 4), piece(&[0, 0], 8, 6, 2)]);
        check_all(&l, 6, 8);
        check_all(&l, 1, 22);
    }

    #[test]
    fn zero_size_arrays() {
        for shape in [&[0u64][..], &[0, 5], &[5, 0], &[3, 0, 2]] {
            let chunk = vec![2; shape.len()];
            let l = layout(shape, &chunk, 4);
            assert_eq!(l.file_size(), 0);
            assert_eq!(l.chunk_count(), 0);
            assert_eq!(l.pieces(0, 100), vec![]);
            assert!(l.chunks_touched(0, 100).is_empty());
        }
        assert_eq!(layout(&[0, 5], &[2, 2], 4).grid_shape(), vec![0, 3]);
    }

    #[test]
    fn scalar() {
        let l = layout(&[], &[], 8);
        assert_eq!(l.file_size(), 8);
        assert_eq!(l.chunk_bytes(), 8);
        assert_eq!(l.grid_shape(), Vec::<u64>::new());
        assert_eq!(l.chunk_count(), 1);
        assert_eq!(l.chunk_linear(&[]), 0);
        assert_eq!(l.chunk_from_linear(0), Vec::<u64>::new());
        assert_eq!(l.pieces(0, 100), vec![piece(&[], 0, 0, 8)]);
        assert_eq!(l.pieces(3, 2), vec![piece(&[], 3, 0, 2)]);
        assert_eq!(l.chunks_touched(3, 2), vec![Vec::<u64>::new()]);
        assert_eq!(l.stripe_bytes(), 8);
    }

    #[test]
    fn invalid_layouts() {
        assert!(ChunkLayout::new(&[4], &[2, 2], 1).is_err());
        assert!(ChunkLayout::new(&[4], &[0], 1).is_err());
        assert!(ChunkLayout::new(&[4], &[2], 0).is_err());
        assert!(ChunkLayout::new(&[1 << 62], &[1], 8).is_err());
        assert!(ChunkLayout::new(&[1], &[1 << 32, 1 << 32], 1).is_err());
        // Huge but representable.
        let l = layout(&[u64::MAX], &[1 << 20], 1);
        assert_eq!(l.grid_shape(), vec![(1 << 44)]);
        check_all(&l, u64::MAX - 10, 100);
    }

    #[test]
    fn stripe_saturates() {
        let l = layout(&[1, 1 << 62, 1], &[1, 1, 1 << 62], 1);
        assert_eq!(l.stripe_bytes(), u64::MAX);
    }

    #[test]
    fn whole_width_chunks_give_one_piece_per_chunk() {
        // Without collapsing dims this would be one run per element.
        let l = layout(&[1 << 20, 1], &[1024, 1], 4);
        let ps = l.pieces(0, 1 << 20);
        assert_eq!(ps.len(), 256);
        assert!(ps.iter().all(|p| p.len == 4096));
        assert_eq!(ps[5].chunk, vec![5, 0]);
        let l = layout(&[10, 7, 3], &[4, 7, 3], 2);
        assert_eq!(l.pieces(0, 1000).len(), 3);
        check_all(&l, 5, 300);
    }

    #[test]
    fn one_mib_read_run_count() {
        let l = layout(&[4096, 4096], &[1024, 1024], 4);
        let ps = l.pieces(12345 * 4, 1 << 20);
        assert_eq!(ps.len(), 257); // starts mid-chunk-row, so one extra partial run
        assert_eq!(ps.iter().map(|p| p.len).sum::<u64>(), 1 << 20);
        assert_eq!(l.chunks_touched(0, 1 << 20).len(), 4);
        assert_eq!(l.stripe_bytes(), 4 * (4 << 20));
    }

    #[test]
    fn chunks_touched_large_range_is_cheap() {
        // 2^38 bytes; enumerating via runs would take ~2^28 steps.
        let l = layout(&[1 << 19, 1 << 19], &[1 << 10, 1 << 10], 1);
        let t = l.chunks_touched(0, l.file_size());
        assert_eq!(t.len() as u64, l.chunk_count());
        assert_eq!(t[0], vec![0, 0]);
        assert_eq!(t[1], vec![0, 1]);
        assert_eq!(*t.last().unwrap(), vec![511, 511]);
    }

    fn arb_case() -> impl Strategy<Value = (Vec<u64>, Vec<u64>, u64, u64, u64)> {
        (1usize..=5)
            .prop_flat_map(|rank| {
                (prop::collection::vec((0u64..=6, 1u64..=7), rank), prop::sample::select(vec![1u64, 2, 4, 8, 16]))
            })
            .prop_flat_map(|(dims, isz)| {
                let shape: Vec<u64> = dims.iter().map(|d| d.0).collect();
                let chunk: Vec<u64> = dims.iter().map(|d| d.1).collect();
                let size = shape.iter().product::<u64>() * isz;
                (Just(shape), Just(chunk), Just(isz), 0..=size + 20, 0..=size + 40)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn pieces_match_naive_model((shape, chunk, isz, offset, len) in arb_case()) {
            let l = layout(&shape, &chunk, isz);
            check_all(&l, offset, len);
        }

        #[test]
        fn whole_file_and_linear_roundtrip((shape, chunk, isz, _o, _l) in arb_case()) {
            let l = layout(&shape, &chunk, isz);
            check_all(&l, 0, u64::MAX);
            let all = l.chunks_touched(0, u64::MAX);
            prop_assert_eq!(all.len() as u64, l.chunk_count());
            // Every chunk exactly once, and linear <-> grid index round-trips.
            let mut linear: Vec<u64> = all.iter().map(|c| l.chunk_linear(c)).collect();
            for (c, &lin) in all.iter().zip(&linear) {
                prop_assert_eq!(&l.chunk_from_linear(lin), c);
            }
            linear.sort_unstable();
            prop_assert_eq!(linear, (0..l.chunk_count()).collect::<Vec<_>>());
            let grid = l.grid_shape();
            let expected = grid.iter().skip(1).product::<u64>() * l.chunk_bytes();
            prop_assert_eq!(l.stripe_bytes(), expected);
            // A stripe really is what one row of chunks along dim 0 touches.
            if l.file_size() > 0 {
                let row_bytes = l.file_size() / shape[0] * chunk[0].min(shape[0]);
                prop_assert_eq!(
                    l.chunks_touched(0, row_bytes).len() as u64 * l.chunk_bytes(),
                    l.stripe_bytes()
                );
            }
        }
    }
}
