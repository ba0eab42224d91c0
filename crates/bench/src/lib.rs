//! kmsgate-bench: a load generator for kmsgate and any AWS XKS proxy, with baselines measured in the same
//! run (a bare hyper server on the same HTTP stack, raw backend throughput), an HDR latency histogram, open-
//! and closed-loop load, and a report that judges the project's performance targets.
//!
//! Everything the generator sends is a real protocol request with a fresh signature; the library parts of
//! kmsgate are used only for the raw backend baselines and for seeding keys before a server starts.

#![forbid(unsafe_code)]

pub mod alibaba;
pub mod baseline;
pub mod client;
pub mod gateway;
pub mod hist;
pub mod instr;
pub mod load;
pub mod report;
pub mod rest;
pub mod seed;
pub mod sigv4;
pub mod standard;
pub mod xks;
