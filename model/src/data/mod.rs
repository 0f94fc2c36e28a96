//! Data pipeline: official formats, text, images, regions, sharded resumable streams.
