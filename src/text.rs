//! One-line messages: every error the user or the log sees is one line, whatever the library
//! that produced it (zarrs and serde errors span lines, object_store chains causes).

/// `s` with every run of whitespace, newlines included, made one space.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An I/O error in the words a one-line message uses.
pub fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a\n  b\tc \n"), "a b c");
    }
}
