//! proxy-wasm ABI 0.2.1 host on wasmtime (see issue "host-sim").
