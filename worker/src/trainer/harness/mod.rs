//! The machinery every training task shares, so a task supplies only its model, batches, losses,
//! parameter-group rule and evaluation: setup (task config, seeded build, `init_checkpoint`, rank-0
//! broadcast), copying saved weights into the model, and the cross-rank averaging of named losses.

pub mod losses;
pub mod setup;
pub mod weights;
