//! Where backup bytes come from and go to: one module per database engine.

pub(crate) mod postgres;
pub(crate) mod qdrant;
