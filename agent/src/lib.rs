//! Portcullis agent: Kubernetes NetworkPolicy enforcement with an eBPF
//! datapath. Data flows one way: compiled endpoint state -> BPF maps ->
//! packets -> flow events.

pub mod api;
pub mod cli;
pub mod cni;
pub mod compiled;
pub mod datapath;
pub mod flows;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod node;
pub mod policy;
pub mod probes;
mod rtnetlink;
pub mod source;
