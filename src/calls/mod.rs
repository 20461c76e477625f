//! 1:1 call signaling (PROTOCOL §2.2): [`machine`] is the pure state machine, [`actor`] its only
//! async shell. Must not import HTTP; the actor talks to the hub and the store.

pub mod actor;
pub mod machine;

#[cfg(test)]
mod tests;
