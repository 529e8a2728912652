//! `zarrfs create`: a new, empty Zarr array (and the groups on its path) in a local store.
//!
//! Invariant: the metadata is built as a document and parsed by zarrs, which also writes it
//! (atomically, through [`LocalDir`]), so nothing is created that zarrfs would refuse to open.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use zarrs::array::{Array, ArrayMetadata};
use zarrs::node::{Node, NodeMetadata};

use crate::storage::local::LocalDir;
use crate::text::one_line;

/// Why an array cannot be created. `Display` is the one-line reason (the caller names the
/// target).
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("--shape has {shape} dimensions but --chunks has {chunks}")]
    Dimensions { shape: usize, chunks: usize },
    #[error("chunk sizes must be at least 1")]
    EmptyChunks,
    #[error("unsupported dtype {0:?} (e.g. u1 i2 i4 i8 f2 f4 f8 c8 c16 bool)")]
    Dtype(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("codec level {0:?} is not a number")]
    CodecLevel(String),
    #[error("unknown codec {0:?} (zstd, blosc, gzip or none)")]
    Codec(String),
    #[error("fill value {text:?} does not fit data type {dtype}")]
    Fill { text: String, dtype: String },
    #[error("--zarr-format must be 2 or 3, not {0}")]
    ZarrFormat(u8),
    #[error("{path} is a Zarr v{format} group; use --zarr-format {format}")]
    GroupFormat { path: String, format: u8 },
    #[error("{0} is an array, not a group")]
    NotAGroup(String),
    /// A group on the way cannot be created.
    #[error("group {path}: {reason}")]
    Group { path: String, reason: String },
    /// zarrs refuses the metadata or cannot store it.
    #[error("{0}")]
    Zarr(String),
}

/// What `zarrfs create` makes: a new, empty array.
#[derive(Debug, Clone)]
pub struct NewArray {
    pub shape: Vec<u64>,
    pub chunks: Vec<u64>,
    /// numpy-style: `f4`, `<f4`, `float32`, `u1`, `bool`, `c8`, ...
    pub dtype: String,
    /// `zstd[:LEVEL]`, `blosc[:LEVEL]`, `gzip[:LEVEL]`, `none`.
    pub codec: String,
    /// The fill value as typed: `0`, `-1.5`, `nan`, `inf`, `true`.
    pub fill: String,
    pub zarr_format: u8,
}

/// Create an empty array at `array_path` ("/" for a root array) of the local store `store`,
/// and the groups on the way that do not exist yet. The metadata is built as a document and
/// checked by zarrs (which also writes it), so anything zarrs would refuse to open is refused.
pub fn create_array(store: &Path, array_path: &str, spec: &NewArray) -> Result<(), CreateError> {
    let storage: Arc<LocalDir> = Arc::new(LocalDir::new(store).map_err(|e| CreateError::Zarr(e.to_string()))?);
    let array_path = if array_path.starts_with('/') { array_path.to_string() } else { format!("/{array_path}") };
    if spec.shape.len() != spec.chunks.len() {
        return Err(CreateError::Dimensions { shape: spec.shape.len(), chunks: spec.chunks.len() });
    }
    if spec.chunks.contains(&0) {
        return Err(CreateError::EmptyChunks);
    }
    let (v3_name, v2_typestr, itemsize) = parse_dtype(&spec.dtype)?;
    if Node::open(&storage, &array_path).is_ok() {
        return Err(CreateError::Exists(array_path));
    }
    let (codec, level) = match spec.codec.split_once(':') {
        Some((c, l)) => (c, Some(l.parse::<i64>().map_err(|_| CreateError::CodecLevel(l.to_string()))?)),
        None => (spec.codec.as_str(), None),
    };
    let fill = parse_fill(&spec.fill, v3_name)?;
    let metadata: Value = if spec.zarr_format == 2 {
        let compressor = match codec {
            "zstd" => json!({"id": "zstd", "level": level.unwrap_or(3)}),
            "blosc" => {
                json!({"id": "blosc", "cname": "lz4", "clevel": level.unwrap_or(5), "shuffle": 1, "blocksize": 0})
            }
            "gzip" => json!({"id": "gzip", "level": level.unwrap_or(5)}),
            "none" => Value::Null,
            other => return Err(CreateError::Codec(other.to_string())),
        };
        json!({"zarr_format": 2, "shape": spec.shape, "chunks": spec.chunks, "dtype": v2_typestr,
               "compressor": compressor, "fill_value": fill, "order": "C", "filters": null,
               "dimension_separator": "."})
    } else if spec.zarr_format == 3 {
        let endian = if itemsize > 1 { json!({"endian": "little"}) } else { json!({}) };
        let mut codecs = vec![json!({"name": "bytes", "configuration": endian})];
        match codec {
            "zstd" => {
                codecs.push(json!({"name": "zstd", "configuration": {"level": level.unwrap_or(3), "checksum": false}}))
            }
            "blosc" => codecs
                .push(json!({"name": "blosc", "configuration": {"cname": "lz4", "clevel": level.unwrap_or(5),
                                          "shuffle": "shuffle", "typesize": itemsize, "blocksize": 0}})),
            "gzip" => codecs.push(json!({"name": "gzip", "configuration": {"level": level.unwrap_or(5)}})),
            "none" => {}
            other => return Err(CreateError::Codec(other.to_string())),
        }
        json!({"zarr_format": 3, "node_type": "array", "shape": spec.shape, "data_type": v3_name,
               "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": spec.chunks}},
               "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
               "fill_value": fill, "codecs": codecs, "attributes": {}})
    } else {
        return Err(CreateError::ZarrFormat(spec.zarr_format));
    };
    let metadata: ArrayMetadata = if spec.zarr_format == 2 {
        ArrayMetadata::V2(serde_json::from_value(metadata).map_err(|e| CreateError::Zarr(e.to_string()))?)
    } else {
        ArrayMetadata::V3(serde_json::from_value(metadata).map_err(|e| CreateError::Zarr(e.to_string()))?)
    };
    // Groups on the way, root first.
    let parts: Vec<&str> = array_path.split('/').filter(|p| !p.is_empty()).collect();
    for depth in 0..parts.len() {
        let group_path = format!("/{}", parts[..depth].join("/"));
        match Node::open(&storage, &group_path).map(|n| n.metadata().clone()) {
            Ok(NodeMetadata::Group(g)) => {
                let format = if matches!(g, zarrs::metadata::GroupMetadata::V2(_)) { 2 } else { 3 };
                if format != spec.zarr_format {
                    return Err(CreateError::GroupFormat { path: group_path, format });
                }
            }
            Ok(NodeMetadata::Array(_)) => return Err(CreateError::NotAGroup(group_path)),
            Err(_) => {
                let group = if spec.zarr_format == 2 {
                    zarrs::metadata::GroupMetadata::V2(
                        serde_json::from_value(json!({"zarr_format": 2}))
                            .map_err(|e| CreateError::Zarr(e.to_string()))?,
                    )
                } else {
                    zarrs::metadata::GroupMetadata::V3(
                        serde_json::from_value(json!({"zarr_format": 3, "node_type": "group", "attributes": {}}))
                            .map_err(|e| CreateError::Zarr(e.to_string()))?,
                    )
                };
                zarrs::group::Group::new_with_metadata(storage.clone(), &group_path, group)
                    .and_then(|g| g.store_metadata().map_err(Into::into))
                    .map_err(|e| CreateError::Group { path: group_path.clone(), reason: one_line(&e.to_string()) })?;
            }
        }
    }
    let zarr = |e: &dyn std::fmt::Display| CreateError::Zarr(one_line(&e.to_string()));
    let array = Array::new_with_metadata(storage, &array_path, metadata).map_err(|e| zarr(&e))?;
    array.store_metadata().map_err(|e| zarr(&e))
}

/// (zarr v3 data type name, zarr v2 typestr, item size) for a numpy-style dtype.
fn parse_dtype(text: &str) -> Result<(&'static str, String, usize), CreateError> {
    let t = text.trim_start_matches(['<', '|', '=']);
    let (name, size) = match t {
        "b1" | "bool" | "?" => ("bool", 1),
        "i1" | "int8" => ("int8", 1),
        "u1" | "uint8" => ("uint8", 1),
        "i2" | "int16" => ("int16", 2),
        "u2" | "uint16" => ("uint16", 2),
        "i4" | "int32" => ("int32", 4),
        "u4" | "uint32" => ("uint32", 4),
        "i8" | "int64" => ("int64", 8),
        "u8" | "uint64" => ("uint64", 8),
        "f2" | "float16" => ("float16", 2),
        "f4" | "float32" => ("float32", 4),
        "f8" | "float64" => ("float64", 8),
        "c8" | "complex64" => ("complex64", 8),
        "c16" | "complex128" => ("complex128", 16),
        _ => return Err(CreateError::Dtype(text.to_string())),
    };
    let kind = match name {
        "bool" => "|b1".to_string(),
        "int8" => "|i1".into(),
        "uint8" => "|u1".into(),
        n if n.starts_with("uint") => format!("<u{size}"),
        n if n.starts_with("int") => format!("<i{size}"),
        n if n.starts_with("float") => format!("<f{size}"),
        _ => format!("<c{size}"),
    };
    Ok((name, kind, size))
}

/// A fill value as JSON metadata, from what a user types.
fn parse_fill(text: &str, v3_name: &str) -> Result<Value, CreateError> {
    let bad = || CreateError::Fill { text: text.to_string(), dtype: v3_name.to_string() };
    let lower = text.trim().to_ascii_lowercase();
    Ok(match v3_name {
        "bool" => match lower.as_str() {
            "0" | "false" => json!(false),
            "1" | "true" => json!(true),
            _ => return Err(bad()),
        },
        n if n.starts_with("float") || n.starts_with("complex") => {
            let f = match lower.as_str() {
                "nan" => return Ok(if n.starts_with("complex") { json!(["NaN", 0.0]) } else { json!("NaN") }),
                "inf" | "infinity" => return Ok(json!("Infinity")),
                "-inf" | "-infinity" => return Ok(json!("-Infinity")),
                _ => lower.parse::<f64>().map_err(|_| bad())?,
            };
            if n.starts_with("complex") {
                json!([f, 0.0])
            } else {
                json!(f)
            }
        }
        n if n.starts_with("uint") => json!(lower.parse::<u64>().map_err(|_| bad())?),
        _ => json!(lower.parse::<i64>().map_err(|_| bad())?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_and_fills() {
        assert_eq!(parse_dtype("<f4").unwrap(), ("float32", "<f4".to_string(), 4));
        assert_eq!(parse_dtype("bool").unwrap(), ("bool", "|b1".to_string(), 1));
        assert_eq!(
            parse_dtype("f3").unwrap_err().to_string(),
            "unsupported dtype \"f3\" (e.g. u1 i2 i4 i8 f2 f4 f8 c8 c16 bool)"
        );
        assert_eq!(parse_fill("nan", "float32").unwrap(), json!("NaN"));
        assert_eq!(parse_fill("-1", "int16").unwrap(), json!(-1));
        assert_eq!(parse_fill("x", "uint8").unwrap_err().to_string(), "fill value \"x\" does not fit data type uint8");
    }

    #[test]
    fn creates_once_and_refuses_bad_specs() {
        let dir = tempfile::tempdir().unwrap();
        let spec = NewArray {
            shape: vec![4, 6],
            chunks: vec![2, 3],
            dtype: "f4".into(),
            codec: "zstd".into(),
            fill: "0".into(),
            zarr_format: 3,
        };
        create_array(dir.path(), "grp/a", &spec).unwrap();
        assert!(dir.path().join("grp/a/zarr.json").is_file());
        assert_eq!(create_array(dir.path(), "grp/a", &spec).unwrap_err().to_string(), "/grp/a already exists");
        let v2 = NewArray { zarr_format: 2, ..spec.clone() };
        assert_eq!(
            create_array(dir.path(), "grp/b", &v2).unwrap_err().to_string(),
            "/ is a Zarr v3 group; use --zarr-format 3"
        );
        let bad = NewArray { chunks: vec![2], ..spec.clone() };
        assert_eq!(
            create_array(dir.path(), "c", &bad).unwrap_err().to_string(),
            "--shape has 2 dimensions but --chunks has 1"
        );
        let bad = NewArray { codec: "lz9".into(), ..spec };
        assert_eq!(
            create_array(dir.path(), "c", &bad).unwrap_err().to_string(),
            "unknown codec \"lz9\" (zstd, blosc, gzip or none)"
        );
    }
}
