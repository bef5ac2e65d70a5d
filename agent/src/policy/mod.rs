//! Policy: identities, the compiler (pure), and the oracle that judges it.

pub mod compile;
pub mod engine;
pub mod identity;
pub mod oracle;
pub mod simulate;

pub use compile::{Compiler, EndpointPolicy, rule_cookie};
pub use engine::{Change, Diff, Engine};
pub use identity::{Identities, IdentityLabels};
pub use simulate::Simulation;
