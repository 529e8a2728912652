//! Reads: assemble the bytes of a file range from its view's header and the chunks the range
//! touches, each chunk dirty, cached, or decoded now (on the decode pool when several miss).
//!
//! Invariants: a read that falls inside one piece of one chunk is served as a slice of that
//! chunk (no copy); anything else is assembled in a per-thread buffer reused across requests,
//! so the read path allocates no fresh megabyte per request. A chunk is decoded at most once
//! however many readers want it at once (the cache's single flight), and a decode failure is
//! logged once, by the decode all its readers share.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{FsError, Ino, MountedArray, ZarrFs};
use crate::cache::{Chunk, ChunkCache, ChunkKey, Claim, Flight};
use crate::source::ChunkError;

thread_local! {
    /// Where a read that spans several pieces is assembled: one buffer per FUSE thread, reused,
    /// because a fresh megabyte per request costs page faults on every read of a scan.
    static ASSEMBLY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ZarrFs {
    /// Read `size` bytes at `offset` of a file (short at end of file, empty past it) and hand
    /// them to `reply`: a slice of a cached chunk when the read falls inside one piece (no
    /// copy), else a buffer assembled from several.
    pub fn read_with<R>(
        &self,
        ino: Ino,
        fh: Option<u64>,
        offset: u64,
        size: u32,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, FsError> {
        let (index, _, view) = self.file(ino)?;
        let header: &[u8] = &view.header;
        let file_size = view.size();
        let end = offset.saturating_add(size as u64).min(file_size);
        if offset >= end {
            return Ok(reply(&[]));
        }
        let header_len = header.len() as u64;
        // The part of the request that falls in the array's data.
        let data_start = offset.max(header_len) - header_len;
        let data_end = end.saturating_sub(header_len);
        if let Some(fh) = fh.filter(|_| data_end > data_start) {
            self.note_read_and_prefetch(fh, index, data_start, data_end);
        }
        let pieces = view.layout.pieces(data_start, data_end.saturating_sub(data_start));
        // Pieces of a multi-dimensional read alternate between chunks row by row.
        let mut slot_of: HashMap<&[u64], usize> = HashMap::new();
        let mut distinct: Vec<&[u64]> = Vec::new();
        let slots: Vec<usize> = pieces
            .iter()
            .map(|p| {
                *slot_of.entry(p.chunk.as_slice()).or_insert_with(|| {
                    distinct.push(p.chunk.as_slice());
                    distinct.len() - 1
                })
            })
            .collect();
        let chunks = self.fetch(index, &distinct)?;
        let head = offset < header_len;
        self.bytes_served.fetch_add(end - offset, Ordering::Relaxed);
        if !head && pieces.len() == 1 {
            let p = &pieces[0];
            let start = p.chunk_offset as usize;
            return Ok(reply(&chunks[0][start..start + p.len as usize]));
        }
        let len = (end - offset) as usize;
        Ok(ASSEMBLY.with_borrow_mut(|buffer| {
            if buffer.len() < len {
                buffer.resize(len, 0);
            }
            // Every byte of out is written below: the header part, then the pieces, which
            // cover the data part exactly.
            let out = &mut buffer[..len];
            let data_out = if head {
                let n = (header_len.min(end) - offset) as usize;
                out[..n].copy_from_slice(&header[offset as usize..offset as usize + n]);
                n
            } else {
                0
            };
            for (p, slot) in pieces.iter().zip(slots) {
                let chunk = &chunks[slot];
                let dst = data_out + p.out_offset as usize;
                let src = p.chunk_offset as usize;
                out[dst..dst + p.len as usize].copy_from_slice(&chunk[src..src + p.len as usize]);
            }
            reply(out)
        }))
    }

    /// Each distinct chunk — dirty, cached, or decoded now. Missing chunks are claimed and
    /// decoded on the decode pool, all at once; this (FUSE) thread only waits, so a decode
    /// thread never blocks on another's work. A read needing a single missing chunk decodes it
    /// here instead: that is the latency of a random read.
    fn fetch(&self, array: usize, distinct: &[&[u64]]) -> Result<Vec<Chunk>, FsError> {
        let a = &self.arrays[array];
        let mut pending: Vec<Result<Chunk, Arc<Flight>>> = Vec::with_capacity(distinct.len());
        let mut inline: Option<(usize, ChunkKey, Arc<Flight>)> = None;
        for (i, c) in distinct.iter().enumerate() {
            let key = chunk_key(array, a, c);
            if let Some(dirty) = self.options.writable.then(|| self.dirty.get(key)).flatten() {
                pending.push(Ok(dirty));
                continue;
            }
            pending.push(match self.cache.claim(key) {
                Claim::Hit(chunk) => Ok(chunk),
                Claim::Wait(flight) => Err(flight),
                Claim::Lead(flight) if distinct.len() == 1 => {
                    inline = Some((i, key, flight.clone()));
                    Err(flight)
                }
                Claim::Lead(flight) => {
                    self.spawn_decode(array, c.to_vec(), key, flight.clone());
                    Err(flight)
                }
            });
        }
        if let Some((i, key, flight)) = inline {
            pending[i] = Ok(lead_decode(&self.cache, a, distinct[i], key, &flight)?);
        }
        pending.into_iter().map(|p| p.or_else(|flight| flight.wait().map_err(FsError::from))).collect()
    }

    /// Decode a claimed chunk on the decode pool.
    pub(super) fn spawn_decode(&self, array: usize, chunk: Vec<u64>, key: ChunkKey, flight: Arc<Flight>) {
        let (cache, arrays) = (self.cache.clone(), self.arrays.clone());
        self.pools.decode.spawn(move || {
            let _ = lead_decode(&cache, &arrays[array], &chunk, key, &flight);
        });
    }
}

/// The cache key of a chunk of array number `array` (its linear index in the C-order grid).
pub(super) fn chunk_key(array: usize, a: &MountedArray, chunk: &[u64]) -> ChunkKey {
    (array as u32, a.layout.chunk_linear(chunk))
}

/// One chunk of array number `array`, from the cache or decoded now (one decode however many
/// ask at once).
pub(super) fn load_chunk(cache: &ChunkCache, array: usize, a: &MountedArray, chunk: &[u64]) -> Result<Chunk, FsError> {
    let key = chunk_key(array, a, chunk);
    Ok(cache.get_or_load(key, a.layout.chunk_bytes(), || decode_checked(a, chunk))?)
}

/// Decode a chunk this caller has claimed (see [`ChunkCache::claim`]).
fn lead_decode(
    cache: &ChunkCache,
    a: &MountedArray,
    chunk: &[u64],
    key: ChunkKey,
    flight: &Flight,
) -> Result<Chunk, ChunkError> {
    cache.lead(key, flight, a.layout.chunk_bytes(), || decode_checked(a, chunk))
}

/// Decode a chunk and check its size; a failure is logged here, once, by the one decode that
/// all readers of the chunk share (each of them gets an I/O error).
fn decode_checked(a: &MountedArray, chunk: &[u64]) -> Result<Vec<u8>, ChunkError> {
    a.decoder
        .decode(chunk)
        .and_then(|bytes| match bytes.len() as u64 == a.layout.chunk_bytes() {
            true => Ok(bytes),
            false => Err(ChunkError::Decode {
                key: format!("{chunk:?}"),
                reason: format!("decoded {} bytes, expected {}", bytes.len(), a.layout.chunk_bytes()),
            }),
        })
        .inspect_err(|e| log::error!("{}: {e}", a.info.path))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{file, mount};
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn reads_match_the_flat_array_at_any_offset() {
        let (fs, src) = mount([30, 20], [8, 7], 1 << 20);
        let expected = src.expected();
        let ino = file(&fs, "a");
        for (offset, len) in [(0, 1200), (1, 3), (37, 500), (1199, 10), (1100, 4096), (1200, 5)] {
            let got = fs.read(ino, None, offset, len).unwrap();
            let end = (offset as usize + len as usize).min(expected.len());
            assert_eq!(got, &expected[(offset as usize).min(end)..end], "offset {offset} len {len}");
        }
        let npy = file(&fs, "a.npy");
        let header = fs.getxattr(npy, OsStr::new("user.npy.data_offset")).unwrap();
        let header: u64 = String::from_utf8(header).unwrap().parse().unwrap();
        let whole = fs.read(npy, None, 0, 1 << 20).unwrap();
        assert_eq!(&whole[..6], b"\x93NUMPY");
        assert_eq!(&whole[header as usize..], &expected[..]);
        assert!(matches!(fs.read(crate::fs::ROOT_INO, None, 0, 1), Err(FsError::IsDir)));
    }

    #[test]
    fn concurrent_readers_of_one_chunk_decode_it_once() {
        let (fs, src) = mount([64, 64], [64, 64], 1 << 20);
        let fs = Arc::new(fs);
        let ino = file(&fs, "a");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let fs = fs.clone();
                std::thread::spawn(move || fs.read(ino, None, i * 100, 64).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(src.total.load(Ordering::SeqCst), 1);
    }
}
