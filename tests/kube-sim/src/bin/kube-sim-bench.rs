//! Benchmark of the emulator (written below).
fn main() {}
