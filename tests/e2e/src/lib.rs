//! End-to-end scenarios and benchmarks of loraplane; they arrive with the end-to-end issue.
