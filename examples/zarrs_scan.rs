//! The decode ceiling for `make bench`: decode every chunk of one array straight from the store
//! with zarrs, on a fixed number of threads, one chunk per task (no codec-internal parallelism).
//!
//! ```text
//! cargo build --release --locked --example zarrs_scan
//! target/release/examples/zarrs_scan STORE /path/of/array --threads 2
//! {"seconds": 0.81, "bytes": 1073741824, "chunks": 256, "threads": 2}
//! ```
//!
//! Prints one JSON line on stdout. The timed part covers opening every chunk file, reading it
//! and decoding it; array metadata is read before the clock starts.
//!
//! By default each decoded chunk is dropped at once, so the allocator hands the same memory to
//! the next decode. With `--keep` every chunk is kept until the end, as a cache of decoded chunks
//! keeps them: each decode then writes into memory the kernel has to fault in and zero first.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use rayon::prelude::*;
use zarrs::array::{Array, ArrayBytes, CodecOptions};
use zarrs::filesystem::FilesystemStore;

#[derive(Parser)]
struct Args {
    /// Directory of the Zarr store.
    store: PathBuf,
    /// Path of the array inside the store, starting with '/'.
    array: String,
    /// Decoding threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Keep every decoded chunk in memory until all are decoded.
    #[arg(long)]
    keep: bool,
}

/// The grid index of linear chunk number `i` in row-major order.
fn unravel(mut i: u64, grid: &[u64]) -> Vec<u64> {
    let mut idx = vec![0u64; grid.len()];
    for d in (0..grid.len()).rev() {
        idx[d] = i % grid[d];
        i /= grid[d];
    }
    idx
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let store = Arc::new(FilesystemStore::new(&args.store)?);
    let array = Array::open(store, &args.array)?;
    let grid: Vec<u64> = array.chunk_grid_shape().to_vec();
    let n: u64 = grid.iter().product();
    let options = CodecOptions::default().with_concurrent_target(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(args.threads.max(1)).build()?;

    let kept = std::sync::Mutex::new(Vec::with_capacity(if args.keep { n as usize } else { 0 }));

    let started = Instant::now();
    let bytes: Result<u64, String> = pool.install(|| {
        (0..n)
            .into_par_iter()
            .map(|i| {
                let idx = unravel(i, &grid);
                let chunk: ArrayBytes<'static> =
                    array.retrieve_chunk_opt(&idx, &options).map_err(|e| format!("chunk {idx:?}: {e}"))?;
                let fixed = chunk.into_fixed().map_err(|e| format!("chunk {idx:?}: {e}"))?.into_owned();
                let len = fixed.len() as u64;
                if args.keep {
                    kept.lock().unwrap().push(fixed);
                }
                Ok(len)
            })
            .try_reduce(|| 0, |a, b| Ok(a + b))
    });
    let seconds = started.elapsed().as_secs_f64();
    let bytes = bytes?;
    drop(kept);
    println!(
        "{}",
        serde_json::json!({"seconds": seconds, "bytes": bytes, "chunks": n, "threads": args.threads, "keep": args.keep})
    );
    Ok(())
}
