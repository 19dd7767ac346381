//! Empty: this crate only pins its dependencies' features (see its Cargo.toml).
