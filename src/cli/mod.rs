//! Settings from the command line and from `-o` option strings.

pub mod options;
