//! `crate::capture` for the fuzz target: the service's event and encoder sources, unchanged.
#[path = "../../../src/capture/avro/mod.rs"]
pub mod avro;
#[path = "../../../src/capture/event.rs"]
pub mod event;
