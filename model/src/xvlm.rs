//! The shared X-VLM core: encoders, projections, cross-modal fusion and the get_* helpers.
