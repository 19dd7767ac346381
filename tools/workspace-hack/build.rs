// Present so that cargo builds the [build-dependencies] (host) feature union.
fn main() {}
