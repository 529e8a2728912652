//! Open handles and prefetch: each open file carries a sequential-read detector; while a handle
//! reads a scan, the decode pool works on the stripes (rows of chunks along the first axis)
//! ahead of it.
//!
//! Invariants: each stripe is handed to the prefetcher once per scan; the prefetch window is
//! at most [`prefetch_depth`] stripes, fixed at mount time so that the stripes being read and
//! decoded fit the cache together (a full scan decodes each chunk exactly once); a strided or
//! short read does not set off decodes far beyond what it reads. Stripes are counted in the
//! array's C-order layout, which every view's data shares today.

use std::sync::atomic::Ordering;

use super::read::chunk_key;
use super::{FsError, Ino, ZarrFs};
use crate::cache::Claim;
use crate::layout::ChunkLayout;

/// Per-open-file state of the sequential-read detector.
#[derive(Debug, Default)]
pub(crate) struct Handle {
    /// Furthest end of the reads of the current scan.
    last_end: u64,
    /// First stripe (row of chunks along axis 0) not yet handed to the prefetcher.
    next_stripe: u64,
    /// Stripe of the previous read, and how many stripe boundaries this scan has crossed:
    /// the prefetch window grows with it, so a reader of a short slice (one worker's share of
    /// an array) does not set off decodes far past its end.
    stripe: u64,
    crossed: u64,
}

/// A read continues a scan when it starts at most this far past the scan's furthest end. Zero:
/// a strided (column) access must not set off whole-stripe prefetches, and a readahead read
/// that arrives early only moves the scan's end, so the reads it overtook still count.
const SEQUENTIAL_GAP: u64 = 0;
/// ... or at most this far before it (several FUSE threads finish out of order).
const SEQUENTIAL_BACK: u64 = 16 << 20;

impl ZarrFs {
    /// Open a file; returns the handle that later reads carry.
    pub fn open(&self, ino: Ino, write: bool) -> Result<u64, FsError> {
        let (_, a, _) = self.file(ino)?;
        if write && a.writer.is_none() {
            return Err(FsError::ReadOnly);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle::default());
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// Sequential-read detection: while a handle reads a scan, keep the decode pool working on
    /// the stripes ahead of it (and on the rest of the current one), each stripe handed over
    /// once. The window starts at one stripe and grows by one per stripe read, up to a depth
    /// fixed at mount time so that the stripes being read and decoded fit the cache together:
    /// a full scan then decodes each chunk exactly once.
    pub(super) fn note_read_and_prefetch(&self, fh: u64, array: usize, start: u64, end: u64) {
        let a = &self.arrays[array];
        if a.prefetch_stripes == 0 || a.chunk_row_bytes == 0 {
            return;
        }
        let stripes = {
            let mut handles = self.handles.lock();
            let Some(h) = handles.get_mut(&fh) else { return };
            // A scan starts at the beginning, or continues where this handle's reads got to.
            let sequential = match h.last_end {
                0 => start == 0,
                last => start <= last + SEQUENTIAL_GAP && start + SEQUENTIAL_BACK >= last,
            };
            let current = start / a.chunk_row_bytes;
            if !sequential {
                *h = Handle { last_end: end, next_stripe: 0, stripe: current, crossed: 0 };
                return;
            }
            h.last_end = h.last_end.max(end);
            let entered = current > h.stripe;
            if entered {
                h.crossed += current - h.stripe;
                h.stripe = current;
            }
            let ahead = a.prefetch_stripes.min(1 + h.crossed);
            // The furthest stripe is handed over only once the reader is half way through the
            // current one: by then the stripe before it is done with (readahead may deliver a
            // scan's reads out of order, but not half a stripe late), so decoding the new
            // stripe can evict it without evicting anything still to be read.
            let reach = if 2 * (start % a.chunk_row_bytes) >= a.chunk_row_bytes { ahead } else { ahead - 1 };
            let last = (current + reach).min(a.layout.file_size().saturating_sub(1) / a.chunk_row_bytes);
            let first = h.next_stripe.max(current);
            h.next_stripe = h.next_stripe.max(last + 1);
            (entered.then_some(current..=last), first..=last)
        };
        let (entered, stripes) = stripes;
        // The stripes ahead were decoded before the reader last used the stripe it just left:
        // mark them used now, nearest first, so that making room for the next one evicts the
        // stripe left behind rather than one still to be read.
        for stripe in entered.into_iter().flatten() {
            for chunk in a.layout.chunks_touched(stripe * a.chunk_row_bytes, a.chunk_row_bytes) {
                self.cache.touch(chunk_key(array, a, &chunk));
            }
        }
        for stripe in stripes {
            for chunk in a.layout.chunks_touched(stripe * a.chunk_row_bytes, a.chunk_row_bytes) {
                let key = chunk_key(array, a, &chunk);
                if self.options.writable && self.dirty.contains(key) {
                    continue;
                }
                if let Claim::Lead(flight) = self.cache.claim(key) {
                    self.spawn_decode(array, chunk, key, flight);
                }
            }
        }
    }
}

/// Stripes to decode ahead of a sequential reader: enough chunks to keep every decode thread
/// busy twice over, and at least two stripes (the furthest is only started half way through
/// the current one), but never more than fit in the cache beside the stripe being read.
pub fn prefetch_depth(layout: &ChunkLayout, cache_bytes: u64, decode_threads: usize) -> u64 {
    let stripe = layout.stripe_bytes().max(1);
    let chunks_per_stripe = (stripe / layout.chunk_bytes().max(1)).max(1);
    let wanted = (2 * decode_threads as u64).div_ceil(chunks_per_stripe).max(2);
    let fit = (cache_bytes / stripe).saturating_sub(1);
    wanted.min(fit)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{file, mount};
    use super::*;

    /// A sequential scan through one handle decodes every chunk exactly once while the cache
    /// holds two stripes, and the cache never exceeds its budget.
    #[test]
    fn sequential_scan_decodes_each_chunk_once_within_budget() {
        let (shape, chunks) = ([256, 96], [16, 32]);
        let chunk_bytes = 16 * 32 * 2;
        let stripe = 3 * chunk_bytes;
        let (fs, src) = mount(shape, chunks, 2 * stripe);
        let ino = file(&fs, "a");
        let fh = fs.open(ino, false).unwrap();
        let expected = src.expected();
        let mut offset = 0;
        while offset < expected.len() as u64 {
            let got = fs.read(ino, Some(fh), offset, 1000).unwrap();
            assert_eq!(got, &expected[offset as usize..(offset as usize + 1000).min(expected.len())]);
            assert!(fs.stats().cached_bytes <= 2 * stripe);
            offset += 1000;
        }
        let decodes = src.decodes.lock().clone();
        assert_eq!(decodes.len(), 16 * 3, "every chunk decoded");
        assert!(decodes.values().all(|n| *n == 1), "no chunk decoded twice: {decodes:?}");
    }

    /// The same with a deep prefetch window (one chunk per stripe, several stripes ahead).
    #[test]
    fn deep_prefetch_scan_decodes_each_chunk_once_within_budget() {
        let chunk_bytes = 4 * 64 * 2;
        let (fs, src) = mount([256, 64], [4, 64], 5 * chunk_bytes);
        assert_eq!(fs.arrays[0].prefetch_stripes, 4);
        let ino = file(&fs, "a");
        let fh = fs.open(ino, false).unwrap();
        let expected = src.expected();
        for offset in (0..expected.len() as u64).step_by(300) {
            let got = fs.read(ino, Some(fh), offset, 300).unwrap();
            assert_eq!(got, &expected[offset as usize..(offset as usize + 300).min(expected.len())]);
            assert!(fs.stats().cached_bytes <= 5 * chunk_bytes);
        }
        let decodes = src.decodes.lock().clone();
        assert_eq!(decodes.len(), 64);
        assert!(decodes.values().all(|n| *n == 1), "no chunk decoded twice: {decodes:?}");
    }

    /// Reading one column with small strided reads is not a scan: only the chunks holding
    /// that column are decoded (rows here are wider than the sequential-read gap).
    #[test]
    fn strided_column_reads_do_not_prefetch() {
        let cols = 70_000u64;
        let (fs, src) = mount([64, cols], [16, 32_768], 1 << 30);
        let ino = file(&fs, "a");
        let fh = fs.open(ino, false).unwrap();
        for r in 0..64u64 {
            let offset = (r * cols + 40_000) * 2;
            let got = fs.read(ino, Some(fh), offset, 2).unwrap();
            assert_eq!(got, src.value(r, 40_000).to_ne_bytes());
        }
        let decodes = src.decodes.lock().clone();
        assert!(decodes.keys().all(|c| c[1] == 1), "only the column's chunks: {:?}", decodes.keys());
        assert_eq!(decodes.len(), 4);
    }

    /// A worker reading its own short slice of rows, and `np.load` reading the `.npy` header,
    /// do not set off decodes far beyond what they read.
    #[test]
    fn short_slices_and_header_reads_prefetch_little() {
        let (fs, src) = mount([256, 64], [4, 64], 1 << 20);
        assert_eq!(fs.arrays[0].prefetch_stripes, 4);
        let npy = file(&fs, "a.npy");
        let fh = fs.open(npy, false).unwrap();
        fs.read(npy, Some(fh), 0, 64).unwrap(); // header only
        assert_eq!(claimed(&fs), 0, "a header read decodes nothing");

        let ino = file(&fs, "a");
        let fh = fs.open(ino, false).unwrap();
        let row = 64 * 2;
        for r in (100..116).step_by(2) {
            fs.read(ino, Some(fh), r * row, 2 * row as u32).unwrap();
        }
        let decoded = claimed(&fs);
        assert!((4..=8).contains(&decoded), "read 4 chunks, decoded {decoded}");
        assert!(src.total.load(Ordering::SeqCst) <= 8);
    }

    /// Chunks decoded or being decoded (prefetches claim synchronously, decode later).
    fn claimed(fs: &ZarrFs) -> usize {
        let a = &fs.arrays[0];
        (0..a.layout.chunk_count())
            .filter(|&i| fs.cache.is_present_or_loading(chunk_key(0, a, &a.layout.chunk_from_linear(i))))
            .count()
    }

    #[test]
    fn prefetch_depth_fits_the_cache() {
        // 16 chunks of 4 MiB per stripe: two stripes ahead keep 2 threads busy...
        let wide = ChunkLayout::new(&[16384, 16384], &[1024, 1024], 4).unwrap();
        assert_eq!(prefetch_depth(&wide, 1 << 30, 2), 2);
        // ...if they fit: with room for two stripes, one; for less, none.
        assert_eq!(prefetch_depth(&wide, 128 << 20, 2), 1);
        assert_eq!(prefetch_depth(&wide, 127 << 20, 2), 0);
        // One chunk per stripe (1-D): several stripes ahead, bounded by the cache.
        let line = ChunkLayout::new(&[1 << 20], &[1 << 16], 4).unwrap();
        assert_eq!(prefetch_depth(&line, 1 << 30, 2), 4);
        assert_eq!(prefetch_depth(&line, 3 << 18, 2), 2);
    }
}
