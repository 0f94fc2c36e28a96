//! AdamW as the official code runs it, param groups, schedule, clipping.
