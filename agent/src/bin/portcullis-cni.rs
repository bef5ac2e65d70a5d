//! The chained CNI plugin on its own: what the container runtime starts
//! for every pod (ADD, DEL, CHECK, VERSION). The agent's binary can do the
//! same (`CNI_COMMAND` set, no arguments), but it is 25 MB of tokio, kube
//! and aya that each plugin process must map, relocate and tear down; this
//! one holds only the plugin, so pods starting together spend their CPU
//! on starting, not on us.

fn main() {
    std::process::exit(portcullis_agent::cni::plugin_main());
}
