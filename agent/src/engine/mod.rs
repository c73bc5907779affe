//! Where backup bytes come from and go to: one module per database engine.

pub mod postgres;
pub mod qdrant;
