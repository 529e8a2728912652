//! The `create` command: split its STORE/PATH argument and create the array.
//! The array itself is made by [`crate::create`]; this only says where.

use std::path::{Path, PathBuf};

use crate::create::{create_array, NewArray};

/// Create the array `spec` at `target` (`data.zarr/grp/temp`, or a store for a root array).
pub fn create(target: &Path, spec: &NewArray) -> Result<(), String> {
    let (store, path) = split_target(target);
    create_array(&store, &path, spec).map_err(|e| format!("{}: {e}", target.display()))
}

/// Split `data.zarr/grp/temp` into the store and the array path within it.
fn split_target(target: &Path) -> (PathBuf, String) {
    let components: Vec<_> = target.components().collect();
    match components.iter().position(|c| c.as_os_str().to_string_lossy().ends_with(".zarr")) {
        Some(i) => {
            let store: PathBuf = components[..=i].iter().collect();
            let rest: PathBuf = components[i + 1..].iter().collect();
            (store, format!("/{}", rest.display()))
        }
        None => (target.to_path_buf(), "/".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(split_target(Path::new("d/x.zarr/g/a")), (PathBuf::from("d/x.zarr"), "/g/a".into()));
        assert_eq!(split_target(Path::new("x.zarr")), (PathBuf::from("x.zarr"), "/".into()));
        assert_eq!(split_target(Path::new("plain")), (PathBuf::from("plain"), "/".into()));
    }
}
