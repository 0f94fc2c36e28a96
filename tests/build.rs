//! rpath to libtorch for the tests that load checkpoints with xvlm-model (shared with the model crate).
#[path = "../model/build/libtorch_link.rs"]
mod libtorch_link;

fn main() {
    libtorch_link::emit_link_args();
}
