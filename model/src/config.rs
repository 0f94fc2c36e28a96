//! Official task YAML keys and model JSON configs (serde), layered with figment.
