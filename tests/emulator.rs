//! Black-box tests of the Graph emulator (`syncbridge graph-emulator`), written from
//! `graph-api.md` (§11 is the checklist). Everything goes over HTTP with reqwest.

#[path = "emulator/common.rs"]
mod common;

#[path = "emulator/auth.rs"]
mod auth;
#[path = "emulator/batch.rs"]
mod batch;
#[path = "emulator/delta.rs"]
mod delta;
#[path = "emulator/items.rs"]
mod items;
#[path = "emulator/lists.rs"]
mod lists;
#[path = "emulator/ops.rs"]
mod ops;
#[path = "emulator/people.rs"]
mod people;
#[path = "emulator/persistence.rs"]
mod persistence;
#[path = "emulator/throttling.rs"]
mod throttling;
