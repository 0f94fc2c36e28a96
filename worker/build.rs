//! rpath to libtorch and the CUDA link, shared with the model crate.
#[path = "../model/build/libtorch_link.rs"]
mod libtorch_link;

fn main() {
    libtorch_link::emit_link_args();
}
