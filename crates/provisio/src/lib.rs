//! The `provisio` command's configuration loading (defaults, TOML file, `PROVISIO_*`
//! variables, flags), as a library so that the in-process test harness
//! (`provisio-testkit`) builds a server's configuration exactly as `provisio serve` does.

pub mod config;
