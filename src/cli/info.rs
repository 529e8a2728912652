//! The `info` command: what arrays a store holds, as a table or as JSON on stdout.

use std::path::Path;

use serde_json::json;

use crate::units::human;

/// Describe the arrays of the store at `store_path` (a directory or a URL) on stdout.
pub fn info(store_path: &Path, as_json: bool) -> Result<(), String> {
    let store = super::serve::open_store(store_path, &Default::default(), false)?;
    let rows: Vec<_> = store
        .arrays
        .iter()
        .map(|a| {
            let i = &a.info;
            let nbytes = i.shape.iter().product::<u64>() * i.itemsize;
            let stored = store.stored_bytes(&i.path);
            (i, nbytes, stored)
        })
        .collect();
    if as_json {
        let arrays: Vec<_> = rows
            .iter()
            .map(|(i, nbytes, stored)| {
                json!({"path": i.path, "dtype": i.dtype, "shape": i.shape, "chunks": i.chunks,
                       "decode_chunks": i.decode_chunk_shape, "codecs": i.codecs,
                       "fill_value": i.fill_value, "nbytes": nbytes, "stored_bytes": stored,
                       "format": i.format.to_string(), "zarr_format": i.format.zarr_version()})
            })
            .collect();
        let skipped: Vec<_> = store.skipped.iter().map(|s| json!({"path": s.path, "reason": s.reason})).collect();
        let doc = json!({"store": store_path, "format": store.format.to_string(), "zarr_format": store.format.zarr_version(), "arrays": arrays, "skipped": skipped});
        println!("{}", serde_json::to_string_pretty(&doc).expect("JSON values serialise"));
        return Ok(());
    }
    println!("{} ({})", store_path.display(), store.format);
    println!("{:<28} {:<6} {:<20} {:<16} {:>12} {:>12}  codecs", "path", "dtype", "shape", "chunks", "size", "stored");
    for (i, nbytes, stored) in &rows {
        println!(
            "{:<28} {:<6} {:<20} {:<16} {:>12} {:>12}  {}",
            i.path,
            i.dtype,
            format!("{:?}", i.shape),
            format!("{:?}", i.chunks),
            human(*nbytes),
            stored.map_or("-".into(), human),
            codec_names(&i.codecs)
        );
    }
    for s in &store.skipped {
        println!("{:<28} skipped: {}", s.path, s.reason);
    }
    Ok(())
}

/// The codec names of a metadata codecs document, e.g. "bytes, zstd".
fn codec_names(codecs: &serde_json::Value) -> String {
    let mut names = Vec::new();
    fn walk(v: &serde_json::Value, names: &mut Vec<String>) {
        match v {
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, names)),
            serde_json::Value::Object(map) => {
                if let Some(n) = map.get("name").or_else(|| map.get("id")).and_then(|n| n.as_str()) {
                    names.push(n.to_string());
                }
                for (k, v) in map {
                    if k == "compressor" || k == "filters" || k == "configuration" || k == "codecs" {
                        walk(v, names);
                    }
                }
            }
            _ => {}
        }
    }
    walk(codecs, &mut names);
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_names_of_v2_and_v3() {
        let v3 = json!([{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}]);
        assert_eq!(codec_names(&v3), "bytes, zstd");
        let v2 = json!({"compressor": {"id": "blosc"}, "filters": [{"id": "delta"}]});
        assert_eq!(codec_names(&v2), "blosc, delta");
    }
}
